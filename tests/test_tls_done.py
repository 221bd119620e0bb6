"""
The whole TLS story on one port: https://a.test and https://b.test with their
own certificates over HTTP/2 and HTTP/1.1, gRPC over TLS, plain HTTP
redirected to https, and any other server name passed through, still
encrypted, to a backend that terminates TLS itself.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor, ssl
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from muxtwist.actions import Proxy, RedirectToHTTPS, TerminateTLS
from muxtwist.matchers import GRPC, HTTP1, SNI, TLS
from muxtwist.sniffing import Rule, SniffingFactory
from tests.test_tls import GrpcFactory, Hello, cert_dir, curl, grpc_call, in_thread, listen, make_pair, pki


class OnePortTests(TestCase):
    """Everything the TLS issue promises, at once, on one listening port."""

    def setUp(self) -> None:
        p = pki()
        other = make_pair("other.test", ["other.test"], p.ca)
        backend_options = ssl.CertificateOptions(
            privateKey=other.key, certificate=other.cert, acceptableProtocols=[b"http/1.1"]
        )
        backend = reactor.listenSSL(0, Site(Hello("backend")), backend_options, interface="127.0.0.1")
        self.addCleanup(backend.stopListening)
        self.grpc = GrpcFactory()
        decrypted = SniffingFactory(
            [
                Rule(GRPC(), self.grpc, name="grpc"),
                Rule(SNI("a.test"), Site(Hello("site-a")), name="a"),
                Rule(SNI("b.test"), Site(Hello("site-b")), name="b"),
            ]
        )
        self.tls = TerminateTLS(cert_dir(self, **{"a.test": p.a, "b.test": p.b}), decrypted)
        self.proxy = Proxy(f"tcp:host=127.0.0.1:port={backend.getHost().port}")
        self.port = listen(
            self,
            SniffingFactory(
                [
                    Rule(TLS(sni=["a.test", "b.test"]), self.tls, name="terminate"),
                    Rule(TLS(), self.proxy, name="passthrough"),
                    Rule(HTTP1(), RedirectToHTTPS(), name="redirect"),
                ]
            ),
        )

    @defer.inlineCallbacks
    def test_one_port(self) -> Any:
        """Every client, at the same time, gets its own certificate, protocol and service."""
        self.assertEqual(self.tls.alpn, ("h2", "http/1.1"))
        results = yield defer.gatherResults(
            [
                curl(self, self.port, "a.test", "--http2"),
                curl(self, self.port, "a.test", "--http1.1"),
                curl(self, self.port, "b.test", "--http2"),
                curl(self, self.port, "b.test", "--http1.1"),
                curl(self, self.port, "b.test", scheme="http"),
                curl(self, self.port, "other.test", "--http1.1"),
                in_thread(grpc_call, self.port, "a.test", b"grpc-client"),
            ],
            consumeErrors=True,
        )
        a2, a1, b2, b1, plain, passthrough, grpc_reply = results
        for (code, out, err), site, cn, version in [
            (a2, b"site-a HTTP/2", b"a.test", b"2"),
            (a1, b"site-a HTTP/1.1", b"a.test", b"1.1"),
            (b2, b"site-b HTTP/2", b"b.test", b"2"),
            (b1, b"site-b HTTP/1.1", b"b.test", b"1.1"),
            (passthrough, b"backend HTTP/1.1", b"other.test", b"1.1"),
        ]:
            self.assertEqual(code, 0, err)
            self.assertEqual(out, site + b" /path?q=1\n" + version + b" 200")
            self.assertIn(b"subject: CN=" + cn, err)
        code, out, err = plain
        self.assertEqual(code, 0, err)
        self.assertTrue(out.endswith(b"\n1.1 301"), out)
        self.assertIn(b"< location: https://b.test/path?q=1", err.lower())
        self.assertEqual(grpc_reply, b"hello grpc-client at /test.Greeter/Hello")
        self.assertEqual([(i.sni, i.alpn) for i in self.grpc.infos], [("a.test", "h2")])
        self.assertEqual(self.tls.stats["failed"], 0)
