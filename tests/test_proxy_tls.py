"""
The relay over TLS on either side, with real clients on loopback: how a
relay ends when one end is TLS (no half-close under the TLS layer, the rest
of the answer delivered, a ``close_notify`` at the end), and active health
checks of TLS backends.
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import subprocess
import time
from typing import Any

from twisted.internet import ssl as tssl
from twisted.internet import threads
from twisted.trial import unittest

from muxtwist import Rule, SniffingFactory
from muxtwist.actions import HealthCheck, Proxy, TerminateTLS
from muxtwist.matchers import TLS
from muxtwist.matchers import Any as AnyMatcher
from tests.certs import Certificate, make_ca, make_certificate
from tests.test_proxy import capture_logs
from tests.test_proxy_support import Peer, PeerFactory, R, backend, mux, need, tempdir, until, wait

NAME = "mux.test"


def answer_for(request: bytes) -> bytes:
    """The answer a test backend gives to a request line ``b"<id> <size>\\n"``: ``size`` bytes that depend on ``id``."""
    ident, size = request.split()
    return random.Random(ident).randbytes(int(size))


class Answerer(Peer):
    """A backend that answers one request line with its bytes and then closes."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if b"\n" in self.received and self.transport is not None and not self.transport.disconnecting:  # type: ignore[attr-defined]
            line = bytes(self.received).split(b"\n", 1)[0]
            self.transport.write(answer_for(line))
            self.transport.loseConnection()


def pem_files(case: unittest.TestCase, leaf: Certificate, ca: Certificate) -> tuple[str, str]:
    """The leaf's certificate and key in one PEM file, and the CA in another; their paths."""
    directory = tempdir(case)
    both = os.path.join(directory, "leaf.pem")
    with open(both, "wb") as f:
        f.write(leaf.cert_pem + leaf.key_pem)
    ca_path = os.path.join(directory, "ca.pem")
    with open(ca_path, "wb") as f:
        f.write(ca.cert_pem)
    return both, ca_path


def terminating_mux(case: unittest.TestCase, inner: Any) -> tuple[int, str, Certificate]:
    """A mux on loopback terminating TLS for ``mux.test`` in front of ``inner``: its port, the CA file, the CA."""
    ca = make_ca()
    leaf = make_certificate(NAME, ca=ca)
    both, ca_path = pem_files(case, leaf, ca)
    port, _ = mux(case, [Rule(TLS(), TerminateTLS({"DEFAULT": both}, inner), name="tls")])
    return port, ca_path, ca


def fetch_over_tls(port: int, ca_pem: bytes, request: bytes) -> tuple[bytes, str]:
    """
    Blocking, for a thread: one TLS connection, one request, everything read.
    The answer and how the connection ended: ``close_notify``, ``eof``
    (a TCP FIN without ``close_notify``), or ``reset``.
    """
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=NAME, suppress_ragged_eofs=False) as s:
            s.sendall(request)
            while True:
                try:
                    chunk = s.recv(65536)
                except ssl.SSLEOFError:
                    return b"".join(chunks), "eof"
                except (ConnectionResetError, ssl.SSLError):
                    return b"".join(chunks), "reset"
                if not chunk:
                    return b"".join(chunks), "close_notify"
                chunks.append(chunk)


class TerminatedClientTests(unittest.TestCase):
    """TerminateTLS -> Proxy -> a plain backend that answers and closes."""

    async def test_python_ssl_client_gets_close_notify_when_backend_closes(self) -> None:
        """A Python ssl client gets the whole answer and a close_notify when the backend closes; nothing is logged."""
        events = capture_logs(self)
        desc, _ = backend(self, Answerer)
        proxy = Proxy(desc)
        port, _, ca = terminating_mux(self, proxy)
        for i in range(5):
            request = b"%d %d\n" % (i, 200_000)
            answer, ending = await wait(threads.deferToThread(fetch_over_tls, port, ca.cert_pem, request), 20)
            self.assertEqual((len(answer), ending), (200_000, "close_notify"))
            self.assertEqual(answer, answer_for(request))
        await until(lambda: not proxy.relays)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual([e for e in events if e.get("isError") or "log_failure" in e], [])

    async def test_openssl_s_client_sees_close_notify_when_backend_closes(self) -> None:
        """openssl s_client receives the answer and the server's close_notify alert, with no unexpected EOF."""
        desc, _ = backend(self, Answerer)
        proxy = Proxy(desc)
        port, ca_path, _ = terminating_mux(self, proxy)
        request = b"s_client 5000\n"
        argv = [
            need("openssl"),
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            NAME,
            "-CAfile",
            ca_path,
            "-verify_return_error",
            "-ign_eof",
            "-quiet",
            "-msg",
        ]

        def s_client() -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(argv, input=request, capture_output=True, timeout=20, start_new_session=True)

        done = await wait(threads.deferToThread(s_client), 30)
        self.assertIn(answer_for(request.strip()), done.stdout)
        received_alerts = [line for line in done.stdout.splitlines() if line.startswith(b"<<<") and b"Alert" in line]
        self.assertEqual(len(received_alerts), 1, (received_alerts, done.stderr))
        self.assertIn(b"close_notify", received_alerts[0])
        self.assertNotIn(b"unexpected eof", done.stderr.lower() + done.stdout.lower())
        await until(lambda: not proxy.relays)
        self.assertEqual(self.flushLoggedErrors(), [])


def read_then_ignore_close_notify(port: int, ca_pem: bytes, request: bytes, wait: float) -> tuple[int, str, float]:
    """
    Blocking, for a thread: one TLS request read to the server's
    ``close_notify``, which this client never answers; then wait up to
    ``wait`` seconds on the bare socket. The answer's length, how the server
    ended the socket (``eof``, ``reset`` or ``open``) and the seconds it took.
    """
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    received = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        s = ctx.wrap_socket(raw, server_hostname=NAME, suppress_ragged_eofs=False)
        s.sendall(request)
        while chunk := s.recv(65536):
            received += len(chunk)
        bare = socket.socket(fileno=os.dup(s.fileno()))
        with bare:
            bare.settimeout(wait)
            started = time.monotonic()
            try:
                ending = "eof" if bare.recv(1) == b"" else "data"
            except ConnectionResetError:
                ending = "reset"
            except TimeoutError:
                ending = "open"
            took = time.monotonic() - started
        s.close()
    return received, ending, took


class UnansweredCloseNotifyTests(unittest.TestCase):
    """TerminateTLS -> Proxy -> a backend that answers and closes, for a client that never answers close_notify."""

    async def test_tls_client_that_never_answers_close_notify_is_aborted_after_close_timeout(self) -> None:
        """A TLS client that never answers the relay's close_notify loses its socket after close_timeout, not never."""
        desc, _ = backend(self, Answerer)
        proxy = Proxy(desc, close_timeout=1.0)
        port, _, ca = terminating_mux(self, proxy)
        request = b"7 100000\n"
        received, ending, took = await wait(
            threads.deferToThread(read_then_ignore_close_notify, port, ca.cert_pem, request, 8.0), 20
        )
        self.assertEqual(received, 100_000)
        self.assertIn(ending, ("eof", "reset"))
        self.assertLess(took, 5.0)
        await until(lambda: not proxy.relays)


def tls_backend(
    case: unittest.TestCase, kind: Any = Answerer, verify_as: str = "backend.test"
) -> tuple[str, Any, PeerFactory]:
    """
    A TLS backend for ``backend.test`` on loopback: its description, client
    TLS options trusting its CA and expecting ``verify_as``, its factory.
    """
    ca = make_ca()
    leaf = make_certificate("backend.test", ca=ca)
    options = tssl.PrivateCertificate.loadPEM(leaf.key_pem + leaf.cert_pem).options()
    factory = PeerFactory(kind)
    port = R.listenSSL(0, factory, options, interface="127.0.0.1")
    case.addCleanup(port.stopListening)

    def close_all() -> None:
        for p in factory.built:
            if p.transport is not None and not p.lost.called:
                p.transport.abortConnection()  # type: ignore[attr-defined]

    case.addCleanup(close_all)
    trust = tssl.optionsForClientTLS(verify_as, trustRoot=tssl.Certificate.loadPEM(ca.cert_pem))
    return f"tcp:host=127.0.0.1:port={port.getHost().port}", trust, factory


def fetch_half_closed(port: int, request: bytes) -> tuple[bytes, str]:
    """
    Blocking, for a thread: send ``request`` over plain TCP, half-close, read
    to the end. The answer and how it ended: ``eof`` or ``reset``.
    """
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return b"".join(chunks), "reset"
            if not chunk:
                return b"".join(chunks), "eof"
            chunks.append(chunk)


class TLSBackendTests(unittest.TestCase):
    """A plain client -> Proxy(tls=...) -> a TLS backend."""

    async def test_client_half_close_keeps_the_whole_answer(self) -> None:
        """50 clients half-closing right after their request each get the TLS backend's whole answer and a clean end."""
        desc, trust, _ = tls_backend(self)
        proxy = Proxy(desc, tls=trust)
        port, _ = mux(self, [Rule(AnyMatcher(), proxy, name="relay")])

        def fifty() -> list[tuple[bool, str]]:
            results = []
            for i in range(50):
                request = b"%d %d\n" % (i, 100_000)
                answer, ending = fetch_half_closed(port, request)
                results.append((answer == answer_for(request), ending))
            return results

        results = await wait(threads.deferToThread(fifty), 60)
        self.assertEqual(results, [(True, "eof")] * 50)
        await until(lambda: not proxy.relays)
        self.assertEqual(proxy.stats[desc].failures, 0)
        self.assertEqual(self.flushLoggedErrors(), [])


class TLSListenerTests(unittest.TestCase):
    """A Proxy behind a listener that is TLS itself (``ssl:`` endpoints, ``listenSSL``)."""

    async def test_tls_listener_relays_plaintext_and_closes_with_close_notify(self) -> None:
        """Behind a TLS listener the backend gets the plaintext and the client the whole answer, then a close_notify."""
        desc, backends = backend(self, Answerer)
        proxy = Proxy(desc, splice=True)
        ca = make_ca()
        leaf = make_certificate(NAME, ca=ca)
        options = tssl.PrivateCertificate.loadPEM(leaf.key_pem + leaf.cert_pem).options()
        factory = SniffingFactory([Rule(AnyMatcher(), proxy, name="relay")])
        listening = R.listenSSL(0, factory, options, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.addCleanup(factory.abort_all)
        request = b"listener 300000\n"
        answer, ending = await wait(
            threads.deferToThread(fetch_over_tls, listening.getHost().port, ca.cert_pem, request), 20
        )
        self.assertEqual(bytes(backends.built[0].received), request)
        self.assertEqual((answer == answer_for(request.strip()), ending), (True, "close_notify"))
        await until(lambda: not proxy.relays)
        self.assertEqual(self.flushLoggedErrors(), [])


class TLSHealthCheckTests(unittest.TestCase):
    """Active health checks of TLS backends without ``expect``."""

    async def checked(self, proxy: Proxy) -> tuple[bool, int, int]:
        """Run the checks until one has passed twice or failed once: (healthy, passed, failed)."""
        proxy.doStart()
        self.addCleanup(proxy.doStop)
        (b,) = proxy.backends
        await until(lambda: b._checks_passed >= 2 or b._checks_failed >= 1)
        return b.stats.healthy, b._checks_passed, b._checks_failed

    async def test_untrusted_certificate_is_down(self) -> None:
        """A TLS backend whose certificate does not verify is marked down by a check without expect."""
        events = capture_logs(self)
        desc, _, factory = tls_backend(self)
        proxy = Proxy(desc, tls="backend.test", health_check=HealthCheck(interval=0.05, timeout=2, rise=1, fall=1))
        self.assertEqual(await self.checked(proxy), (False, 0, 1))
        (down,) = [e for e in events if "is down" in e.get("log_format", "")]
        self.assertIn("certificate verification failed", down["why"])
        self.assertTrue(all(p.received == b"" for p in factory.built))

    async def test_wrong_hostname_is_down(self) -> None:
        """A TLS backend with a trusted certificate for another name is marked down by a check without expect."""
        desc, trust, _ = tls_backend(self, verify_as="other.test")
        proxy = Proxy(desc, tls=trust, health_check=HealthCheck(interval=0.05, timeout=2, rise=1, fall=1))
        self.assertEqual(await self.checked(proxy), (False, 0, 1))

    async def test_verified_backend_is_up(self) -> None:
        """A TLS backend whose certificate verifies passes a check without expect once the handshake is done."""
        desc, trust, _ = tls_backend(self)
        proxy = Proxy(desc, tls=trust, health_check=HealthCheck(interval=0.05, timeout=2, rise=1, fall=1))
        self.assertEqual(await self.checked(proxy), (True, 2, 0))
