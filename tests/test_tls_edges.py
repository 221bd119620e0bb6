"""
Tests for muxtwist.tls at its edges: the ALPN offer decided by matcher types,
certificate sets with nothing in them, and the limits on concurrent TLS
handshakes, with real TLS clients on loopback.
"""

from __future__ import annotations

import os
import socket
import ssl
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from muxtwist.matchers import GRPC, HTTP1, HTTP2
from muxtwist.metrics import Metrics
from muxtwist.sniffing import Rule, SniffingFactory
from muxtwist.tls import CertificateError, TerminateTLS
from tests.test_tls import Recorder, cert_dir, client_context, client_hello, in_thread, listen, mux, pki, tls_get


class ALPNByTypeTests(TestCase):
    """TerminateTLS offers h2 because of what the inner matchers are, never because of their labels."""

    @defer.inlineCallbacks
    def test_renamed_grpc_matcher_keeps_h2_offered(self) -> Any:
        """GRPC(name="api") still makes TerminateTLS offer h2, and a real client offering h2 negotiates it."""
        recorder = Recorder()
        inner = SniffingFactory([Rule(GRPC(name="api"), recorder, name="api")], on_no_match=recorder)
        tls = TerminateTLS(cert_dir(self, **{"a.test": pki().a}), inner)
        self.assertEqual(tls.alpn, ("h2", "http/1.1"))
        port = listen(self, mux(tls))
        result = yield in_thread(tls_get, port, "a.test", client_context(alpn=["h2", "http/1.1"]), b"hi")
        self.assertEqual(result["alpn"], "h2")
        self.assertEqual(recorder.infos[-1].alpn, "h2")

    def test_renamed_http2_matcher_keeps_h2_offered(self) -> None:
        """HTTP2(name="frontend") counts as HTTP/2 like HTTP2() does."""
        tls = TerminateTLS(
            cert_dir(self, **{"a.test": pki().a}), SniffingFactory([Rule(HTTP2(name="frontend"), Recorder())])
        )
        self.assertEqual(tls.alpn, ("h2", "http/1.1"))

    @defer.inlineCallbacks
    def test_label_that_looks_like_grpc_does_not_offer_h2(self) -> Any:
        """An HTTP/1 matcher labelled "grpc" does not make TerminateTLS offer h2 to a client asking for it."""
        recorder = Recorder()
        inner = SniffingFactory([Rule(HTTP1(name="grpc"), recorder, name="web")], on_no_match=recorder)
        tls = TerminateTLS(cert_dir(self, **{"a.test": pki().a}), inner)
        self.assertEqual(tls.alpn, ("http/1.1",))
        port = listen(self, mux(tls))
        result = yield in_thread(tls_get, port, "a.test", client_context(alpn=["h2", "http/1.1"]), b"hi")
        self.assertEqual(result["alpn"], "http/1.1")


class NoCertificateTests(TestCase):
    """A TerminateTLS with no certificate at all is refused when it is made, not at every handshake."""

    def test_empty_directory_refused(self) -> None:
        """An existing but empty certificate directory raises CertificateError naming it."""
        empty = self.mktemp()
        os.makedirs(empty)
        with open(os.path.join(empty, "README.txt"), "w") as f:
            f.write("not a certificate\n")
        with self.assertRaises(CertificateError) as caught:
            TerminateTLS(empty, Recorder())
        self.assertIn(empty, str(caught.exception))
        self.assertIn("no certificate", str(caught.exception))

    def test_empty_mapping_refused(self) -> None:
        """An empty mapping of certificates raises CertificateError."""
        with self.assertRaises(CertificateError) as caught:
            TerminateTLS({}, Recorder())
        self.assertIn("no certificate", str(caught.exception))

    def test_rules_file_with_empty_directory_is_a_load_error(self) -> None:
        """A rules file building TerminateTLS on an empty directory fails to load with file, line and reason."""
        from muxtwist.config import ConfigError, load_config

        empty = os.path.abspath(self.mktemp())
        os.makedirs(empty)
        path = os.path.abspath(self.mktemp() + "-rules.py")
        with open(path, "w") as f:
            f.write(
                "from twisted.internet.protocol import Factory, Protocol\n"
                "from muxtwist import Rule\n"
                "from muxtwist.actions import TerminateTLS\n"
                "from muxtwist.matchers import TLS\n"
                f"rules = [Rule(TLS(), TerminateTLS({empty!r}, Factory.forProtocol(Protocol)))]\n"
            )
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertEqual(caught.exception.line, 5)
        self.assertIn("no certificate", caught.exception.problem)


class HandshakeLimitTests(TestCase):
    """Concurrent TLS handshakes are limited overall and per source, counted and logged."""

    def stall(self, port: int) -> socket.socket:
        """A client that sends half a ClientHello and waits."""
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(s.close)
        hello = client_hello("a.test")
        s.sendall(hello[: len(hello) // 2])
        return s

    @defer.inlineCallbacks
    def wait_handshaking(self, tls: TerminateTLS, n: int) -> Any:
        for _ in range(500):
            if tls.handshaking == n:
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail(f"{tls.handshaking} handshakes in progress, wanted {n}")

    @defer.inlineCallbacks
    def check_limit(self, limit: str, **options: Any) -> Any:
        metrics = Metrics()
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        tls = TerminateTLS(cert_dir(self, **{"a.test": pki().a}), Recorder(), metrics=metrics, **options)
        port = listen(self, mux(tls))
        stalled = [self.stall(port), self.stall(port)]
        yield self.wait_handshaking(tls, 2)
        for _ in range(3):
            with self.assertRaises((ssl.SSLError, OSError)):
                yield in_thread(tls_get, port, "a.test", client_context(), b"hi")
        self.assertEqual(metrics.value("muxtwist_limit_rejections_total", limit=limit), 3)
        self.assertEqual(tls.stats["refused"], 3)
        refusals = [e for e in events if e.get("limit") == limit]
        self.assertEqual(len(refusals), 1, "one log line per second per limit, not one per connection")
        stalled[0].close()
        yield self.wait_handshaking(tls, 1)
        result = yield in_thread(tls_get, port, "a.test", client_context(), b"hi")
        self.assertEqual(result["body"], b"echo:hi")
        self.assertEqual(tls.handshaking, 1)

    def test_handshakes_beyond_max_handshakes_are_refused(self) -> Any:
        """With max_handshakes=2 and two stalled handshakes, a third client is closed at once until one ends."""
        return self.check_limit("max_handshakes", max_handshakes=2, max_handshakes_per_source=None)

    def test_handshakes_beyond_the_per_source_limit_are_refused(self) -> Any:
        """With max_handshakes_per_source=2, a source with two stalled handshakes gets no third one."""
        return self.check_limit("max_handshakes_per_source", max_handshakes=None, max_handshakes_per_source=2)

    def test_limits_have_defaults_and_are_checked(self) -> None:
        """The limits are on by default, and a limit that is not a positive integer is refused."""
        certificates = cert_dir(self, **{"a.test": pki().a})
        tls = TerminateTLS(certificates, Recorder())
        self.assertEqual((tls.max_handshakes, tls.max_handshakes_per_source), (1000, 50))
        for bad in (0, -1, 1.5, True):
            with self.assertRaises(ValueError):
                TerminateTLS(certificates, Recorder(), max_handshakes=bad)  # type: ignore[arg-type]
