"""
Tests for muxtwist.tls and muxtwist.redirect: TLS termination with real
clients (curl, openssl s_client, Python ssl, grpcio) on loopback sockets.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, protocol, reactor, task, threads
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from muxtwist.interfaces import ConnectionInfo, IConnectionInfoFactory, IRetiringFactory
from muxtwist.matchers import ALPN, HTTP1, SNI, Prefix
from muxtwist.matchers import Any as AnyBytes
from muxtwist.redirect import RedirectToHTTPS
from muxtwist.sniffing import Rule, SniffingFactory
from muxtwist.tls import CertificateError, TerminateTLS, offered_protocols, reload_all_certificates

DEADLINE = 10.0


# Certificates


class Pair:
    """A certificate and its key, as cryptography objects and PEM."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self.key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pair(cn: str, sans: Sequence[str] = (), ca: Pair | None = None, *, is_ca: bool = False) -> Pair:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.cert.subject if ca else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), critical=False)
    if ca is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    return Pair(builder.sign(ca.key if ca else key, hashes.SHA256()), key)


class PKI:
    """A CA and the certificates the tests serve and present."""

    def __init__(self) -> None:
        self.ca = make_pair("muxtwist test CA", is_ca=True)
        self.a = make_pair("a.test", ["a.test"], self.ca)
        self.b = make_pair("b.test", ["b.test"], self.ca)
        self.wild = make_pair("*.wild.test", ["*.wild.test"], self.ca)
        self.default = make_pair("default.test", ["default.test"], self.ca)
        self.client = make_pair("client one", ["client.test"], self.ca)
        self.stranger_ca = make_pair("stranger CA", is_ca=True)
        self.stranger = make_pair("stranger", ["stranger.test"], self.stranger_ca)


_pki: PKI | None = None


def pki() -> PKI:
    global _pki
    if _pki is None:
        _pki = PKI()
    return _pki


def write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def cert_dir(test: TestCase, **pairs: Pair) -> str:
    """A certificate directory with one PEM (chain + key) per ``name=pair``."""
    path = test.mktemp()
    os.makedirs(path)
    for name, pair in pairs.items():
        write(os.path.join(path, f"{name}.pem"), pair.cert_pem + pair.key_pem)
    return path


def ca_file(test: TestCase) -> str:
    path = test.mktemp()
    return write(path, pki().ca.cert_pem)


# Servers


class Hello(Resource):
    """Answers with a label, the HTTP version and the path."""

    isLeaf = True

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def render_GET(self, request: Request) -> bytes:
        return b"%s %s %s" % (self.label.encode(), request.clientproto, request.uri)


@implementer(IConnectionInfoFactory)
class Recorder(protocol.Factory):
    """Records the ConnectionInfo each connection brings and answers one line with it."""

    def __init__(self) -> None:
        self.infos: list[ConnectionInfo] = []

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        return self.buildProtocolForConnection(addr, ConnectionInfo(peer=addr), "")

    def buildProtocolForConnection(self, addr: IAddress, info: ConnectionInfo, rule_name: str) -> IProtocol | None:
        self.infos.append(info)
        proto = _Echo()
        proto.factory = self
        return proto


class _Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"echo:" + data)
        self.transport.loseConnection()


def listen(test: TestCase, factory: IProtocolFactory) -> int:
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    if isinstance(factory, SniffingFactory):
        # Inner factories stop when their last connection ends: wait for it.
        test.addCleanup(lambda: factory.when_idle().addTimeout(5, reactor))
        test.addCleanup(factory.abort_all)
    return int(port.getHost().port)


def deadline(d: defer.Deferred[Any], seconds: float = DEADLINE) -> defer.Deferred[Any]:
    return d.addTimeout(seconds, reactor)


# External clients


class _Collect(protocol.ProcessProtocol):
    def __init__(self, done: defer.Deferred[tuple[int, bytes, bytes]]) -> None:
        self.done = done
        self.out: list[bytes] = []
        self.err: list[bytes] = []

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.done.callback((code if code is not None else -1, b"".join(self.out), b"".join(self.err)))


def run(test: TestCase, argv: Sequence[str], stdin: bytes = b"", timeout: float = DEADLINE) -> defer.Deferred[Any]:
    """Run a command; its (exit code, stdout, stderr). Killed at ``timeout`` and at cleanup."""
    done: defer.Deferred[tuple[int, bytes, bytes]] = defer.Deferred()
    pp = _Collect(done)
    process = reactor.spawnProcess(pp, argv[0], list(argv), env=os.environ)
    if stdin:
        process.write(stdin)
    process.closeStdin()

    def kill() -> None:
        try:
            process.signalProcess("KILL")
        except Exception:
            pass

    timer = reactor.callLater(timeout, kill)
    test.addCleanup(lambda: timer.active() and timer.cancel())
    test.addCleanup(kill)
    return done


def curl(test: TestCase, port: int, host: str, *args: str, scheme: str = "https") -> defer.Deferred[Any]:
    argv = [
        "curl",
        "-sS",
        "-v",
        "--max-time",
        "8",
        "--resolve",
        f"{host}:{port}:127.0.0.1",
        "--cacert",
        ca_file(test),
        "-w",
        "\n%{http_version} %{http_code}",
        *args,
        f"{scheme}://{host}:{port}/path?q=1",
    ]
    return run(test, argv)


def client_context(*, cert: Pair | None = None, test: TestCase | None = None, alpn: Sequence[str] = ()) -> Any:
    ctx = ssl.create_default_context(cafile=None)
    ctx.load_verify_locations(cadata=pki().ca.cert_pem.decode())
    if cert is not None and test is not None:
        path = test.mktemp()
        write(path, cert.cert_pem + cert.key_pem)
        ctx.load_cert_chain(path)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def tls_get(
    port: int, server_hostname: str | None, ctx: ssl.SSLContext, request: bytes | None = None
) -> dict[str, Any]:
    """Blocking: one TLS connection, one request, everything read; for deferToThread."""
    if server_hostname is None:
        ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_hostname) as s:
            cert = x509.load_der_x509_certificate(s.getpeercert(binary_form=True) or b"")
            result: dict[str, Any] = {"cn": _cn(cert), "alpn": s.selected_alpn_protocol(), "version": s.version()}
            if request is None:
                host = server_hostname or "nobody"
                request = b"GET /x HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host.encode()
            if request:
                s.sendall(request)
                result["body"] = _read_all(s)
            return result


def _read_all(s: socket.socket | ssl.SSLSocket) -> bytes:
    chunks = []
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        try:
            chunk = s.recv(65536)
        except (ssl.SSLZeroReturnError, ConnectionResetError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def in_thread(f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    return deadline(threads.deferToThread(f, *args, **kwargs), DEADLINE + 5)


def http_sites() -> SniffingFactory:
    """The decrypted side: a.test and b.test, each its own Site, by SNI."""
    return SniffingFactory(
        [
            Rule(SNI("a.test"), Site(Hello("site-a")), name="a"),
            Rule(SNI("b.test", "*.wild.test"), Site(Hello("site-b")), name="b"),
            Rule(AnyBytes(), Site(Hello("fallback")), name="fallback"),
        ]
    )


def mux(tls: TerminateTLS, *more: Rule) -> SniffingFactory:
    return SniffingFactory([Rule(Prefix(b"\x16\x03"), tls, name="tls"), *more])


class SingleServingTests(TestCase):
    """Certificates by SNI, ALPN and the HTTP versions, with curl and openssl."""

    def setUp(self) -> None:
        p = pki()
        self.tls = TerminateTLS(cert_dir(self, **{"a.test": p.a, "b.test": p.b, "_.wild.test": p.wild}), http_sites())
        self.port = listen(self, mux(self.tls, Rule(HTTP1(), RedirectToHTTPS(), name="redirect")))

    @defer.inlineCallbacks
    def test_curl_http11(self) -> Any:
        """curl --http1.1 to a.test gets a.test's certificate and the a.test site over HTTP/1.1."""
        code, out, err = yield curl(self, self.port, "a.test", "--http1.1")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"site-a HTTP/1.1 /path?q=1\n1.1 200")
        self.assertIn(b"subject: CN=a.test", err)
        self.assertIn(b"ALPN: server accepted http/1.1", err)

    @defer.inlineCallbacks
    def test_curl_http2(self) -> Any:
        """curl --http2 to b.test negotiates h2 and gets b.test's certificate and site."""
        code, out, err = yield curl(self, self.port, "b.test", "--http2")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"site-b HTTP/2 /path?q=1\n2 200")
        self.assertIn(b"subject: CN=b.test", err)

    @defer.inlineCallbacks
    def test_curl_wildcard(self) -> Any:
        """A name under *.wild.test gets the wildcard certificate from _.wild.test.pem."""
        code, out, err = yield curl(self, self.port, "x.wild.test", "--http2")
        self.assertEqual(code, 0, err)
        self.assertIn(b"subject: CN=*.wild.test", err)
        self.assertEqual(out, b"site-b HTTP/2 /path?q=1\n2 200")

    @defer.inlineCallbacks
    def test_plain_http_redirected(self) -> Any:
        """Plain HTTP on the same port is redirected to https, Host port dropped."""
        code, out, err = yield curl(self, self.port, "a.test", scheme="http")
        self.assertEqual(code, 0, err)
        self.assertTrue(out.endswith(b"\n1.1 301"), out)
        self.assertIn(b"< location: https://a.test/path?q=1", err.lower())

    @defer.inlineCallbacks
    def test_openssl_s_client_alpn(self) -> Any:
        """openssl s_client with -servername b.test -alpn h2 sees b.test's certificate and ALPN h2."""
        argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{self.port}", "-servername", "b.test"]
        argv += ["-alpn", "h2,http/1.1", "-CAfile", ca_file(self), "-verify_return_error"]
        code, out, err = yield run(self, argv, stdin=b"Q\n")
        self.assertIn(b"ALPN protocol: h2", out)
        self.assertIn(b"subject=CN = b.test", out)
        self.assertIn(b"Verify return code: 0 (ok)", out)

    @defer.inlineCallbacks
    def test_no_sni_without_default_fails_cleanly(self) -> Any:
        """With no DEFAULT certificate, a client without SNI gets a handshake failure and nothing else breaks."""
        ctx = client_context()
        error = yield self.assertFailure(in_thread(tls_get, self.port, None, ctx), ssl.SSLError)
        self.assertIn("HANDSHAKE_FAILURE", str(error))
        self.assertEqual(self.tls.stats["failed"], 1)
        result = yield in_thread(tls_get, self.port, "a.test", client_context())
        self.assertEqual(result["cn"], "a.test")

    @defer.inlineCallbacks
    def test_python_client_alpn_to_inner_info(self) -> Any:
        """The negotiated ALPN protocol reaches Python's ssl client as the server's preference."""
        result = yield in_thread(tls_get, self.port, "a.test", client_context(alpn=["http/1.1", "h2"]), b"")
        self.assertEqual(result["alpn"], "h2")
        self.assertEqual(self.tls.alpn, ("h2", "http/1.1"))


class DefaultCertificateTests(TestCase):
    """The DEFAULT certificate and what the inner factory is told."""

    def setUp(self) -> None:
        p = pki()
        self.recorder = Recorder()
        inner = SniffingFactory(
            [
                Rule(ALPN("x-echo"), self.recorder, name="echo"),
                Rule(SNI("a.test"), self.recorder, name="a"),
            ],
            on_no_match=self.recorder,
        )
        self.tls = TerminateTLS(cert_dir(self, **{"a.test": p.a, "DEFAULT": p.default}), inner)
        self.port = listen(self, mux(self.tls))

    @defer.inlineCallbacks
    def test_unknown_sni_gets_default(self) -> Any:
        """An SNI nothing covers gets DEFAULT.pem; the inner rules see that SNI."""
        ctx = client_context()
        ctx.check_hostname = False
        result = yield in_thread(tls_get, self.port, "nobody.test", ctx, b"hi")
        self.assertEqual(result["cn"], "default.test")
        self.assertEqual(result["body"], b"echo:hi")
        self.assertEqual(self.recorder.infos[-1].sni, "nobody.test")
        self.assertEqual(self.recorder.infos[-1].peer.host, "127.0.0.1")

    @defer.inlineCallbacks
    def test_no_sni_gets_default(self) -> Any:
        """A client that sends no SNI gets DEFAULT.pem and an info with sni None."""
        result = yield in_thread(tls_get, self.port, None, client_context(), b"hi")
        self.assertEqual(result["cn"], "default.test")
        self.assertIsNone(self.recorder.infos[-1].sni)

    @defer.inlineCallbacks
    def test_alpn_from_inner_rules(self) -> Any:
        """An ALPN matcher inside makes TerminateTLS offer its protocol, and the info carries it."""
        self.assertEqual(self.tls.alpn, ("x-echo", "http/1.1"))
        result = yield in_thread(tls_get, self.port, "A.TEST", client_context(alpn=["x-echo"]), b"hi")
        self.assertEqual(result["alpn"], "x-echo")
        self.assertEqual(result["cn"], "a.test")
        info = self.recorder.infos[-1]
        self.assertEqual((info.sni, info.alpn), ("a.test", "x-echo"))

    @defer.inlineCallbacks
    def test_alpn_without_overlap(self) -> Any:
        """A client offering none of our protocols still connects, with no ALPN."""
        result = yield in_thread(tls_get, self.port, "a.test", client_context(alpn=["x-unknown"]), b"hi")
        self.assertIsNone(result["alpn"])
        self.assertEqual(result["body"], b"echo:hi")
        self.assertIsNone(self.recorder.infos[-1].alpn)


def split_hello_get(port: int, host: str) -> dict[str, Any]:
    """Blocking: a TLS client whose ClientHello goes out as two TLS records, in two TCP segments."""
    ctx = client_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=host)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    content_type, version, length = hello[0], hello[1:3], struct.unpack("!H", hello[3:5])[0]
    assert content_type == 0x16 and len(hello) == 5 + length, "expected the ClientHello in one record"
    body = hello[5:]
    half = len(body) // 2
    first = bytes([content_type]) + version + struct.pack("!H", half) + body[:half]
    second = bytes([content_type]) + version + struct.pack("!H", len(body) - half) + body[half:]
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(first)
        time.sleep(0.05)  # two TCP segments, not a wait for an event
        s.sendall(second)
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = outgoing.read()
                if pending:
                    s.sendall(pending)
                data = s.recv(65536)
                if not data:
                    raise ConnectionError("closed during the handshake") from None
                incoming.write(data)
        s.sendall(outgoing.read())
        cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
        tls.write(b"GET /split HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host.encode())
        s.sendall(outgoing.read())
        body_parts = []
        finished = False
        while not finished and time.monotonic() < end:
            data = s.recv(65536)
            if not data:
                break
            incoming.write(data)
            while True:
                try:
                    chunk = tls.read(65536)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    chunk = b""
                if not chunk:
                    finished = True
                    break
                body_parts.append(chunk)
        return {"records": (first[:5], second[:5]), "cn": _cn(cert), "body": b"".join(body_parts)}


def raw_exchange(port: int, data: bytes) -> tuple[bytes, float]:
    """Blocking: send ``data``, read until the server closes; what came back and how long it took."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        s.sendall(data)
        return _read_all(s), time.monotonic() - start


def client_hello(host: str) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context().wrap_bio(incoming, outgoing, server_hostname=host)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class RobustnessTests(TestCase):
    """Odd and hostile clients fail alone, and the port keeps serving others."""

    def setUp(self) -> None:
        p = pki()
        self.tls = TerminateTLS(cert_dir(self, **{"a.test": p.a, "b.test": p.b}), http_sites(), handshake_timeout=1.0)
        self.port = listen(self, mux(self.tls))

    @defer.inlineCallbacks
    def test_client_hello_over_two_records(self) -> Any:
        """A ClientHello split over two TLS records, in two TCP segments, is served normally."""
        result = yield in_thread(split_hello_get, self.port, "b.test")
        first, second = result["records"]
        self.assertEqual((first[0], second[0]), (0x16, 0x16))
        self.assertEqual(result["cn"], "b.test")
        self.assertIn(b"site-b HTTP/1.1 /split", result["body"])

    @defer.inlineCallbacks
    def test_tls10_client_refused(self) -> Any:
        """A client that offers only TLS 1.0 is refused with a protocol_version alert."""
        argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{self.port}", "-servername", "a.test"]
        argv += ["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"]
        code, out, err = yield run(self, argv, stdin=b"Q\n")
        self.assertNotEqual(code, 0)
        self.assertIn(b"alert protocol version", err)
        self.assertEqual((self.tls.stats["failed"], self.tls.stats["handshakes"]), (1, 0))

    @defer.inlineCallbacks
    def test_garbage_after_record_header(self) -> Any:
        """Garbage after a handshake record header gets an alert and a close, at once; the line names host:port."""
        from twisted.logger import formatEvent, globalLogPublisher

        lines: list[str] = []

        def keep(event: dict[str, Any]) -> None:
            lines.append(formatEvent(event))

        globalLogPublisher.addObserver(keep)
        self.addCleanup(globalLogPublisher.removeObserver, keep)
        # Far from the time the exchange takes even on a busy host: closed at once, not at the timeout.
        self.tls.handshake_timeout = 30.0
        back, took = yield in_thread(raw_exchange, self.port, b"\x16\x03\x01\x00\x40" + b"\xee" * 64)
        self.assertEqual(back[:1], b"\x15", "a TLS alert record")
        self.assertLess(took, 10, "closed before the handshake timeout")
        self.assertEqual(self.tls.stats["failed"], 1)
        failed = [line for line in lines if line.startswith("TLS handshake with ")]
        self.assertEqual(len(failed), 1, lines)
        self.assertRegex(failed[0], r"^TLS handshake with 127\.0\.0\.1:\d+ failed: ")

    @defer.inlineCallbacks
    def test_stalled_handshake_aborted(self) -> Any:
        """A client that stops halfway through its ClientHello is aborted at handshake_timeout."""
        hello = client_hello("a.test")
        back, took = yield in_thread(raw_exchange, self.port, hello[: len(hello) // 2])
        self.assertEqual(back, b"")
        self.assertGreaterEqual(took, 0.95)
        self.assertLess(took, 5.0)
        self.assertEqual((self.tls.stats["timed_out"], self.tls.stats["failed"]), (1, 1))

    @defer.inlineCallbacks
    def test_others_undisturbed(self) -> Any:
        """A live keep-alive connection keeps working through a stall, garbage and a TLS 1.0 client."""
        port = self.port

        def scenario() -> tuple[bytes, bytes]:
            ctx = client_context()
            with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw:
                with ctx.wrap_socket(raw, server_hostname="a.test") as live:
                    live.sendall(b"GET /one HTTP/1.1\r\nHost: a.test\r\n\r\n")
                    first = live.recv(65536)
                    hello = client_hello("b.test")
                    stall = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
                    stall.sendall(hello[:20])
                    raw_exchange(port, b"\x16\x03\x01\x00\x40" + b"\xee" * 64)
                    subprocess.run(
                        [
                            "openssl",
                            "s_client",
                            "-connect",
                            f"127.0.0.1:{port}",
                            "-tls1",
                            "-cipher",
                            "DEFAULT@SECLEVEL=0",
                        ],
                        input=b"Q\n",
                        capture_output=True,
                        timeout=DEADLINE,
                    )
                    self.assertEqual(_read_all(stall), b"")
                    stall.close()
                    live.sendall(b"GET /two HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
                    second = _read_all(live)
                    return first, second

        first, second = yield in_thread(scenario)
        self.assertIn(b"site-a HTTP/1.1 /one", first)
        self.assertIn(b"site-a HTTP/1.1 /two", second)
        self.assertEqual(self.tls.stats, {"handshakes": 1, "failed": 3, "timed_out": 1, "refused": 0})


class MutualTLSTests(TestCase):
    """client_ca: clients must show a certificate the CA signed, and the rules see it."""

    def setUp(self) -> None:
        p = pki()
        self.recorder = Recorder()
        self.tls = TerminateTLS(cert_dir(self, **{"a.test": p.a}), self.recorder, client_ca=ca_file(self))
        self.port = listen(self, mux(self.tls))

    @defer.inlineCallbacks
    def test_client_certificate_reaches_rules(self) -> Any:
        """A client certificate signed by client_ca is accepted and reaches the inner factory's info."""
        ctx = client_context(cert=pki().client, test=self)
        result = yield in_thread(tls_get, self.port, "a.test", ctx, b"ping")
        self.assertEqual(result["body"], b"echo:ping")
        peer = self.recorder.infos[-1].peer_certificate
        self.assertIsInstance(peer, x509.Certificate)
        self.assertEqual(_cn(peer), "client one")

    @defer.inlineCallbacks
    def test_no_client_certificate_refused(self) -> Any:
        """A client without a certificate is refused and the inner factory never sees it."""
        yield self.assertFailure(in_thread(tls_get, self.port, "a.test", client_context(), b"ping"), ssl.SSLError)
        self.assertEqual(self.recorder.infos, [])
        self.assertEqual(self.tls.stats["failed"], 1)

    @defer.inlineCallbacks
    def test_foreign_client_certificate_refused(self) -> Any:
        """A client certificate from another CA is refused."""
        ctx = client_context(cert=pki().stranger, test=self)
        yield self.assertFailure(in_thread(tls_get, self.port, "a.test", ctx, b"ping"), ssl.SSLError)
        self.assertEqual(self.recorder.infos, [])


def keep_alive_get(live: ssl.SSLSocket, path: str, host: str) -> bytes:
    """Blocking: one request on a keep-alive connection, read up to the end of its small body."""
    live.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), host.encode()))
    data = b""
    end = time.monotonic() + DEADLINE
    while path.encode() not in data and time.monotonic() < end:
        chunk = live.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def serial_of(port: int, host: str) -> int:
    """Blocking: the serial number of the certificate served for ``host``."""
    ctx = client_context()
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            return x509.load_der_x509_certificate(s.getpeercert(binary_form=True) or b"").serial_number


class ReloadTests(TestCase):
    """Certificates are read again on reload; live connections keep theirs."""

    def setUp(self) -> None:
        p = pki()
        self.dir = cert_dir(self, **{"a.test": p.a})
        self.tls = TerminateTLS(self.dir, http_sites())
        self.factory = mux(self.tls)
        self.port = listen(self, self.factory)

    @defer.inlineCallbacks
    def test_rotation_without_restart(self) -> Any:
        """A rotated certificate is served to new connections while a live one carries on."""
        p, port, path = pki(), self.port, os.path.join(self.dir, "a.test.pem")
        rotated = make_pair("a.test", ["a.test"], p.ca)

        def scenario() -> tuple[int, int, bytes, bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw:
                with client_context().wrap_socket(raw, server_hostname="a.test") as live:
                    before = keep_alive_get(live, "/before", "a.test")
                    old = x509.load_der_x509_certificate(live.getpeercert(binary_form=True) or b"").serial_number
                    write(path, rotated.cert_pem + rotated.key_pem)
                    threads.blockingCallFromThread(reactor, reload_all_certificates, self.factory)
                    new = serial_of(port, "a.test")
                    after = keep_alive_get(live, "/after", "a.test")
                    return old, new, before, after

        old, new, before, after = yield in_thread(scenario)
        self.assertEqual(old, p.a.cert.serial_number)
        self.assertEqual(new, rotated.cert.serial_number)
        self.assertIn(b"site-a HTTP/1.1 /before", before)
        self.assertIn(b"site-a HTTP/1.1 /after", after)

    @defer.inlineCallbacks
    def test_broken_file_keeps_old_certificate(self) -> Any:
        """A certificate file broken at reload keeps the certificate it held, and reload says so."""
        write(os.path.join(self.dir, "a.test.pem"), b"-----BEGIN CERTIFICATE-----\nnot base64\n")
        self.assertFalse(self.tls.reload_certificates())
        serial = yield in_thread(serial_of, self.port, "a.test")
        self.assertEqual(serial, pki().a.cert.serial_number)

    @defer.inlineCallbacks
    def test_new_and_removed_files(self) -> Any:
        """A new file adds its host and a removed one drops it, through MuxService.reload."""
        from muxtwist.service import MuxService

        p = pki()
        write(os.path.join(self.dir, "b.test.pem"), p.b.cert_pem + p.b.key_pem)
        os.remove(os.path.join(self.dir, "a.test.pem"))
        self.assertEqual(self.tls.hosts, ["a.test"])
        service = MuxService(reactor=reactor)
        service.add_listener("tcp:0:interface=127.0.0.1", self.factory)
        self.addCleanup(self.factory.doStop)
        service.reload()
        self.assertEqual(self.tls.hosts, ["b.test"])
        result = yield in_thread(tls_get, self.port, "b.test", client_context())
        self.assertEqual(result["cn"], "b.test")
        yield self.assertFailure(in_thread(tls_get, self.port, "a.test", client_context()), ssl.SSLError)


class GrpcResponder(protocol.Protocol):
    """A minimal gRPC server for unary calls, on the h2 library: answers ``hello <request>``."""

    def connectionMade(self) -> None:
        from h2.config import H2Configuration
        from h2.connection import H2Connection

        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.bodies: dict[int, bytes] = {}
        self.paths: dict[int, str] = {}
        self.transport.write(self.h2.data_to_send())

    def dataReceived(self, data: bytes) -> None:
        from h2 import events

        for event in self.h2.receive_data(data):
            if isinstance(event, events.RequestReceived):
                self.bodies[event.stream_id] = b""
                self.paths[event.stream_id] = dict(event.headers)[":path"]
            elif isinstance(event, events.DataReceived):
                self.bodies[event.stream_id] += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, events.StreamEnded):
                self._answer(event.stream_id)
        self.transport.write(self.h2.data_to_send())

    def _answer(self, stream_id: int) -> None:
        body = self.bodies.pop(stream_id)
        reply = b"hello " + body[5:] + b" at " + self.paths.pop(stream_id).encode()
        self.h2.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
        self.h2.send_data(stream_id, b"\x00" + struct.pack("!I", len(reply)) + reply)
        self.h2.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)


@implementer(IConnectionInfoFactory)
class GrpcFactory(protocol.Factory):
    protocol = GrpcResponder

    def __init__(self) -> None:
        self.infos: list[ConnectionInfo] = []

    def buildProtocolForConnection(self, addr: IAddress, info: ConnectionInfo, rule_name: str) -> IProtocol | None:
        self.infos.append(info)
        return self.buildProtocol(addr)


def grpc_call(port: int, host: str, message: bytes) -> bytes:
    """Blocking: one unary call over a grpcio secure channel."""
    import grpc

    credentials = grpc.ssl_channel_credentials(root_certificates=pki().ca.cert_pem)
    options = [("grpc.ssl_target_name_override", host), ("grpc.enable_retries", 0)]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        call = channel.unary_unary("/test.Greeter/Hello")
        reply: bytes = call(message, timeout=DEADLINE)
        return reply


class GrpcTests(TestCase):
    """gRPC over TLS, with a grpcio client and an in-process HTTP/2 handler."""

    @defer.inlineCallbacks
    def test_grpcio_secure_channel(self) -> Any:
        """A grpcio secure channel negotiates h2 through TerminateTLS and gets its answer."""
        p = pki()
        grpc_factory = GrpcFactory()
        inner = SniffingFactory(
            [Rule(ALPN("h2"), grpc_factory, name="grpc"), Rule(HTTP1(), Site(Hello("web")), name="web")]
        )
        tls = TerminateTLS(cert_dir(self, **{"a.test": p.a}), inner)
        self.assertEqual(tls.alpn, ("h2", "http/1.1"))
        port = listen(self, mux(tls))
        reply = yield in_thread(grpc_call, port, "a.test", b"world")
        self.assertEqual(reply, b"hello world at /test.Greeter/Hello")
        self.assertEqual((grpc_factory.infos[0].sni, grpc_factory.infos[0].alpn), ("a.test", "h2"))


class CertificateStoreTests(TestCase):
    """Which certificate a server name gets, from a directory or a mapping (no sockets)."""

    def test_directory_names(self) -> None:
        """Files name hosts, _.x stands for *.x, DEFAULT covers the rest; names are case-insensitive."""
        p = pki()
        tls = TerminateTLS(cert_dir(self, **{"a.test": p.a, "_.wild.test": p.wild, "DEFAULT": p.default}), Recorder())
        self.assertEqual(tls.hosts, ["*.wild.test", "DEFAULT", "a.test"])
        a, wild, default = tls.context_for("a.test"), tls.context_for("x.wild.test"), tls.context_for(None)
        self.assertEqual(len({id(a), id(wild), id(default)}), 3)
        self.assertIs(tls.context_for("A.Test."), a)
        self.assertIs(tls.context_for("wild.test"), default, "a wildcard needs a label in its place")
        self.assertIs(tls.context_for("x.y.wild.test"), default, "a wildcard covers one label")
        self.assertIs(tls.context_for("other.test"), default)

    def test_mapping(self) -> None:
        """A mapping of host to (certificate, key) paths, or to one path holding both, works like a directory."""
        p = pki()
        base = self.mktemp()
        os.makedirs(base)
        cert = write(os.path.join(base, "a.crt"), p.a.cert_pem)
        key = write(os.path.join(base, "a.key"), p.a.key_pem)
        both = write(os.path.join(base, "b.pem"), p.b.key_pem + p.b.cert_pem)
        tls = TerminateTLS({"a.test": (cert, key), "B.test": both}, Recorder())
        self.assertEqual(tls.hosts, ["a.test", "b.test"])
        self.assertIsNone(tls.context_for("c.test"))

    def test_broken_file_at_start(self) -> None:
        """A broken or mismatched file at construction is a CertificateError naming the file."""
        p = pki()
        base = self.mktemp()
        os.makedirs(base)
        cert = write(os.path.join(base, "a.crt"), p.a.cert_pem)
        other_key = write(os.path.join(base, "b.key"), p.b.key_pem)
        error = self.assertRaises(CertificateError, TerminateTLS, {"a.test": (cert, other_key)}, Recorder())
        self.assertIn("a.crt", str(error))
        error = self.assertRaises(CertificateError, TerminateTLS, {"a.test": cert}, Recorder())
        self.assertIn("no PEM private key", str(error))
        missing = os.path.join(base, "missing.pem")
        error = self.assertRaises(CertificateError, TerminateTLS, {"a.test": missing}, Recorder())
        self.assertIn("missing.pem", str(error))

    def test_missing_directory(self) -> None:
        """A directory that is not there is a CertificateError at start, and a logged failure at reload."""
        missing = self.mktemp()
        self.assertRaises(CertificateError, TerminateTLS, missing, Recorder())
        p = pki()
        path = cert_dir(self, **{"a.test": p.a})
        tls = TerminateTLS(path, Recorder())
        os.remove(os.path.join(path, "a.test.pem"))
        os.rmdir(path)
        self.assertFalse(tls.reload_certificates())
        self.assertEqual(tls.hosts, ["a.test"])

    def test_min_version_checked(self) -> None:
        """An unknown min_version is refused at once."""
        self.assertRaises(ValueError, TerminateTLS, {}, Recorder(), min_version="SSLv2")

    def test_passes_start_and_stop_through(self) -> None:
        """doStart/doStop reach the inner factory."""
        inner = Recorder()
        tls = TerminateTLS(cert_dir(self, **{"a.test": pki().a}), inner)
        tls.doStart()
        self.assertEqual(inner.numPorts, 1)
        tls.doStop()
        self.assertEqual(inner.numPorts, 0)


class OfferedProtocolsTests(TestCase):
    """ALPN derived from what the inner factory can speak."""

    def test_site_offers_h2(self) -> None:
        """A twisted.web Site can speak HTTP/2, so h2 is offered first."""
        self.assertEqual(offered_protocols(Site(Hello("x"))), ["h2", "http/1.1"])

    def test_plain_factory(self) -> None:
        """A factory that is not known to speak HTTP/2 gets http/1.1 only."""
        self.assertEqual(offered_protocols(Recorder()), ["http/1.1"])

    def test_site_behind_http1_rule(self) -> None:
        """A Site reachable only through an HTTP1 matcher does not make h2 offered."""
        inner = SniffingFactory([Rule(HTTP1(), Site(Hello("x")))])
        self.assertEqual(offered_protocols(inner), ["http/1.1"])

    def test_alpn_matchers_and_nesting(self) -> None:
        """ALPN matchers of nested rules add their protocols; a Site behind SNI counts for h2."""
        from muxtwist.matchers import AnyOf

        inner = SniffingFactory(
            [
                Rule(AnyOf(ALPN("x-one"), ALPN("h2")), Recorder()),
                Rule(ALPN("x-two", "http/1.1"), SniffingFactory([Rule(SNI("a.test"), Site(Hello("x")))])),
            ]
        )
        self.assertEqual(offered_protocols(inner), ["h2", "x-one", "x-two", "http/1.1"])

    def test_explicit_alpn(self) -> None:
        """An explicit alpn wins, and an empty one turns ALPN off."""
        certificates = cert_dir(self, **{"a.test": pki().a})
        self.assertEqual(TerminateTLS(certificates, Site(Hello("x")), alpn=["http/1.1"]).alpn, ("http/1.1",))
        self.assertEqual(TerminateTLS(certificates, Site(Hello("x")), alpn=[]).alpn, ())


def redirect(request: bytes, port: int | None = None) -> bytes:
    """What RedirectToHTTPS answers to ``request``, in memory."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionDone
    from twisted.internet.testing import StringTransport

    factory = RedirectToHTTPS(port)
    proto = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1234))
    transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
    proto.makeConnection(transport)
    proto.dataReceived(request)
    proto.connectionLost(Failure(ConnectionDone()))
    return bytes(transport.value())


class RedirectTests(TestCase):
    """RedirectToHTTPS answers plain HTTP with a redirect to https."""

    def test_get_is_301(self) -> None:
        """GET gets a 301 to the same host without its port, path and query kept."""
        out = redirect(b"GET /a/b?c=d HTTP/1.1\r\nHost: Example.COM:8080\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 301 "), out)
        self.assertIn(b"Location: https://example.com/a/b?c=d\r\n", out)

    def test_post_is_308_with_port(self) -> None:
        """Other methods get a 308, which keeps the method; a non-443 port is named."""
        out = redirect(b"POST /form HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n", port=8443)
        self.assertTrue(out.startswith(b"HTTP/1.1 308 "), out)
        self.assertIn(b"Location: https://a.test:8443/form\r\n", out)
        self.assertIn(
            b"Location: https://a.test/form\r\n", redirect(b"GET /form HTTP/1.1\r\nHost: a.test\r\n\r\n", 443)
        )

    def test_absolute_form_and_ipv6(self) -> None:
        """An absolute-form target keeps only its path; a bracketed IPv6 Host stays bracketed."""
        out = redirect(b"GET http://a.test/x?y HTTP/1.1\r\nHost: [::1]:80\r\n\r\n")
        self.assertIn(b"Location: https://[::1]/x?y\r\n", out)

    def test_bad_host_refused(self) -> None:
        """A Host that is not a host name or address is refused, not echoed into Location."""
        out = redirect(b"GET / HTTP/1.1\r\nHost: evil.test/phish@x\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out)
        self.assertNotIn(b"Location", out)

    def test_no_host_uses_local_address(self) -> None:
        """An HTTP/1.0 request without Host is sent to the address it came in on."""
        out = redirect(b"GET /old HTTP/1.0\r\n\r\n")
        self.assertIn(b"Location: https://127.0.0.1/old\r\n", out)

    def test_port_checked(self) -> None:
        """A port outside 1-65535 is refused at once."""
        self.assertRaises(ValueError, RedirectToHTTPS, 0)


class RetiringTests(TestCase):
    def test_retiring_is_passed_to_the_factory_behind(self) -> None:
        """A TerminateTLS the rules no longer name tells the factory behind it, which may close idle connections."""

        @implementer(IRetiringFactory)
        class Told(protocol.Factory):
            told = 0

            def retiring(self) -> None:
                self.told += 1

        p = pki()
        inner = Told()
        tls = TerminateTLS(cert_dir(self, **{"a.test": p.a}), inner)
        self.assertTrue(IRetiringFactory.providedBy(tls))
        tls.retiring()
        self.assertEqual(inner.told, 1)
        TerminateTLS(cert_dir(self, **{"a.test": p.a}), protocol.Factory()).retiring()  # nothing to tell: no error

    def test_a_factory_behind_that_raises_when_told_is_logged_and_the_reload_goes_on(self) -> None:
        """An exception from the inner factory's retiring() is logged; the reload installs its rules, all told."""

        @implementer(IRetiringFactory)
        class Told(protocol.Factory):
            def __init__(self, fail: bool) -> None:
                self.told = self.stops = 0
                self.fail = fail

            def retiring(self) -> None:
                self.told += 1
                if self.fail:
                    raise RuntimeError("retiring failed")

            def doStop(self) -> None:
                self.stops += 1

        p = pki()
        failing, other, new = Told(fail=True), Told(fail=False), Told(fail=False)
        tls = TerminateTLS(cert_dir(self, **{"a.test": p.a}), failing)
        tls.retiring()  # it must not raise (IRetiringFactory): logged as the inner factory's
        errors = self.flushLoggedErrors(RuntimeError)
        self.assertEqual((len(errors), failing.told), (1, 1))
        factory = SniffingFactory(
            [Rule(Prefix(b"A"), tls, name="tls"), Rule(Prefix(b"B"), other, name="other")], reactor=task.Clock()
        )
        factory.doStart()
        factory.set_rules([Rule(Prefix(b"A"), new, name="tls")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual((failing.told, other.told, new.told), (2, 1, 0))
        self.assertEqual((failing.stops, other.stops), (1, 1))
        self.assertEqual([rule.factory for rule in factory.rules], [new])
        factory.doStop()
