"""
The WSGI and ASGI targets behind ``TerminateTLS`` when a client negotiates
HTTP/2 by ALPN (twisted.web serves it for a WSGI target), with the ``h2``
library as the client over real TLS sockets on 127.0.0.1: a stop's
``shutdown()``, streams opened after its (or ``retiring()``'s) GOAWAY, and
a large streamed body to a client that does not read.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
from hyperframe.frame import Frame, GoAwayFrame
from twisted.internet import threads
from twisted.internet.task import deferLater
from twisted.trial import unittest

from muxtwist import Rule
from muxtwist.actions import TerminateTLS
from muxtwist.apps import WSGI
from muxtwist.matchers import Prefix
from tests.certs import make_certificate
from tests.test_apps_wsgi import Streaming
from tests.test_proxy_support import R, mux, until, wait


class H2Client:
    """
    A blocking HTTP/2 client over TLS (ALPN h2) on the ``h2`` library, run
    on a thread of its own; ``pump`` reads what the server sends, for a
    bounded time, and records its events.
    """

    def __init__(self, port: int, *, window: int | None = None) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        if window is not None:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.sock = context.wrap_socket(raw, server_hostname="a.test")
        self.alpn = self.sock.selected_alpn_protocol()
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
            self.conn.increment_flow_control_window(window - 65535)
        self.sock.sendall(self.conn.data_to_send())
        self.events: list[h2.events.Event] = []
        self.bodies: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        #: The error code of each stream the server reset.
        self.reset: dict[int, int] = {}
        self.goaway: GoAwayFrame | None = None
        self.goaways: list[GoAwayFrame] = []
        self._frames = bytearray()
        self.closed = False

    def request(self, path: str) -> int:
        stream_id: int = self.conn.get_next_available_stream_id()
        headers = [(":method", "GET"), (":path", path), (":scheme", "https"), (":authority", "a.test")]
        self.conn.send_headers(stream_id, headers, end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        self.bodies[stream_id] = bytearray()
        return stream_id

    def open(self, path: str) -> int:
        """A POST to ``path`` whose body is still to come (:meth:`send_body`)."""
        stream_id: int = self.conn.get_next_available_stream_id()
        headers = [(":method", "POST"), (":path", path), (":scheme", "https"), (":authority", "a.test")]
        self.conn.send_headers(stream_id, headers)
        self.sock.sendall(self.conn.data_to_send())
        self.bodies[stream_id] = bytearray()
        return stream_id

    def send_body(self, stream_id: int, body: bytes) -> None:
        """All of ``body`` on ``stream_id``, then its end (the flow-control windows must have room for it)."""
        size = self.conn.max_outbound_frame_size
        for start in range(0, len(body), size):
            self.conn.send_data(stream_id, body[start : start + size])
        self.conn.end_stream(stream_id)
        self.sock.sendall(self.conn.data_to_send())

    def post(self, path: str, body: bytes) -> int:
        """A POST to ``path`` with ``body``, its HEADERS and DATA in one write."""
        stream_id: int = self.conn.get_next_available_stream_id()
        headers = [(":method", "POST"), (":path", path), (":scheme", "https"), (":authority", "a.test")]
        self.conn.send_headers(stream_id, headers)
        self.bodies[stream_id] = bytearray()
        self.send_body(stream_id, body)
        return stream_id

    def pump(self, until: Callable[[], bool], seconds: float) -> bool:
        """Read and handle frames until ``until()`` holds, the connection closes, or ``seconds`` pass."""
        deadline = time.monotonic() + seconds
        while not until() and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return until()
            except (ssl.SSLError, OSError):
                data = b""
            if not data:
                self.closed = True
                break
            for event in self.conn.receive_data(self._without_goaway(data)):
                self.events.append(event)
                if isinstance(event, h2.events.DataReceived):
                    self.bodies[event.stream_id] += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    self.ended.add(event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    self.reset[event.stream_id] = event.error_code
            pending = self.conn.data_to_send()
            if pending:
                try:
                    self.sock.sendall(pending)
                except OSError:
                    pass
        return until()

    def _without_goaway(self, data: bytes) -> bytes:
        """
        ``data`` less the GOAWAY frames, kept in ``goaway``: h2 takes a GOAWAY
        as the end of the connection and refuses the answers that follow,
        where a client such as curl or nghttp goes on reading the streams the
        GOAWAY says will be answered.
        """
        self._frames += data
        out = bytearray()
        while len(self._frames) >= 9:
            length = int.from_bytes(self._frames[:3], "big")
            if len(self._frames) < 9 + length:
                break
            frame, self._frames = bytes(self._frames[: 9 + length]), self._frames[9 + length :]
            if frame[3] == 0x7:
                goaway, _ = Frame.parse_frame_header(memoryview(frame[:9]))
                goaway.parse_body(memoryview(frame[9:]))
                assert isinstance(goaway, GoAwayFrame)
                self.goaway = goaway
                self.goaways.append(goaway)
            else:
                out += frame
        return bytes(out)

    def close(self) -> None:
        self.sock.close()


class Held:
    """
    A WSGI app: ``/hello`` answers at once, ``/slow`` once ``release`` is
    set, ``/echo`` with the length of the body it read; ``paths`` lists the
    paths it was called for.
    """

    def __init__(self) -> None:
        self.release = threading.Event()
        self.running = 0
        self.paths: list[str] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., object]) -> Iterable[bytes]:
        self.paths.append(environ["PATH_INFO"])
        if environ["PATH_INFO"] == "/echo":
            body = environ["wsgi.input"].read()
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"read %d" % len(body)]
        if environ["PATH_INFO"] == "/slow":
            self.running += 1
            self.release.wait(10)
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"done"]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hello"]


def tls_mux(case: unittest.TestCase, target: Any) -> int:
    """A port on 127.0.0.1 where TLS (ALPN h2 offered) leads to ``target``."""
    certificate = make_certificate("a.test")
    directory = case.mktemp()
    os.makedirs(directory)
    path = os.path.join(directory, "a.test.pem")
    with open(path, "wb") as f:
        f.write(certificate.cert_pem + certificate.key_pem)
    tls = TerminateTLS(directory, target)
    port, factory = mux(case, [Rule(Prefix(b"\x16\x03"), tls, name="tls")])
    factory.doStart()
    case.addCleanup(factory.doStop)
    return port


def connect(case: unittest.TestCase, port: int, **options: Any) -> Any:
    """An :class:`H2Client` (on a thread), closed in cleanup."""

    def made(client: H2Client) -> H2Client:
        case.addCleanup(client.close)
        return client

    return wait(threads.deferToThread(H2Client, port, **options), 10).addCallback(made)


def pump(client: H2Client, condition: Callable[[], bool], seconds: float) -> Any:
    return wait(threads.deferToThread(client.pump, condition, seconds), seconds + 5)


class WSGIHTTP2ShutdownTests(unittest.TestCase):
    async def test_shutdown_sends_goaway_to_idle_http2_connections_and_lets_busy_ones_answer(self) -> None:
        """shutdown() gives an idle HTTP/2 connection a GOAWAY and closes it at once, a busy one after its answer."""
        app = Held()
        self.addCleanup(app.release.set)
        target = WSGI(app, threads=2)
        port = tls_mux(self, target)
        idle = await connect(self, port)
        busy = await connect(self, port)
        self.assertEqual((idle.alpn, busy.alpn), ("h2", "h2"))
        stream = idle.request("/hello")
        self.assertTrue(await pump(idle, lambda: stream in idle.ended, 5))
        self.assertEqual(bytes(idle.bodies[stream]), b"hello")
        slow = busy.request("/slow")
        await until(lambda: app.running == 1, 5)
        started = time.monotonic()
        target.shutdown()
        # At once: 5 s leaves a busy host room and is still half PARTIAL_REQUEST_GRACE.
        self.assertTrue(await pump(idle, lambda: idle.closed, 5), "the idle HTTP/2 connection stayed open")
        self.assertLess(time.monotonic() - started, 5)
        self.assertIsNotNone(idle.goaway, "closed without a GOAWAY")
        assert idle.goaway is not None
        self.assertEqual((idle.goaway.error_code, idle.goaway.last_stream_id), (0, stream))
        # The busy one is told no new streams will be served, and stays open for its answer.
        await pump(busy, lambda: busy.closed, 0.5)
        self.assertFalse(busy.closed, f"the busy HTTP/2 connection was closed before its answer: {busy.events}")
        self.assertNotIn(slow, busy.ended)
        app.release.set()
        self.assertTrue(await pump(busy, lambda: busy.closed, 5), "the busy HTTP/2 connection stayed open")
        self.assertIn(slow, busy.ended)
        self.assertEqual(bytes(busy.bodies[slow]), b"done")
        self.assertIsNotNone(busy.goaway)
        assert busy.goaway is not None
        self.assertEqual((busy.goaway.error_code, busy.goaway.last_stream_id), (0, slow))


class WSGIHTTP2RefusedAfterGoawayTests(unittest.TestCase):
    """RFC 9113 section 6.8: streams a client opens after our GOAWAY are refused, the earlier ones answered."""

    async def test_streams_opened_after_shutdowns_goaway_are_refused_and_earlier_ones_answered(self) -> None:
        """
        After shutdown()'s GOAWAY, streams above its last stream id get
        RST_STREAM REFUSED_STREAM and never reach the app (their bodies do
        not use up the connection's window), while the streams below it, one
        still sending its body, are answered in full; then the connection closes.
        """
        app = Held()
        self.addCleanup(app.release.set)
        target = WSGI(app, threads=4)
        port = tls_mux(self, target)
        client = await connect(self, port)
        self.assertEqual(client.alpn, "h2")
        posting = client.open("/echo")
        slow = client.request("/slow")
        # The server has read both HEADERS once the app runs for the second.
        await until(lambda: app.running == 1, 5)
        target.shutdown()
        self.assertTrue(await pump(client, lambda: client.goaway is not None, 5), "no GOAWAY")
        assert client.goaway is not None
        self.assertEqual((client.goaway.error_code, client.goaway.last_stream_id), (0, slow))
        # Eight refused streams, each with a body (in the TLS record of its
        # HEADERS), twice what the connection's flow-control window holds.
        late: list[int] = []
        for _ in range(8):
            room = await pump(client, lambda: client.conn.outbound_flow_control_window >= 16000, 5)
            self.assertTrue(room, "the refused streams' bodies used up the connection's flow-control window")
            late.append(client.post("/late", b"x" * 16000))
        self.assertTrue(await pump(client, lambda: all(s in client.reset for s in late), 5), f"{client.events}")
        self.assertEqual(client.reset, dict.fromkeys(late, h2.errors.ErrorCodes.REFUSED_STREAM))
        self.assertTrue(await pump(client, lambda: client.conn.local_flow_control_window(posting) >= 16000, 5))
        client.send_body(posting, b"y" * 16000)
        self.assertTrue(await pump(client, lambda: posting in client.ended, 5), f"{client.events}")
        self.assertEqual(bytes(client.bodies[posting]), b"read 16000")
        self.assertFalse(client.closed, "closed while a stream below the GOAWAY's last stream id was unanswered")
        app.release.set()
        self.assertTrue(await pump(client, lambda: client.closed, 5), "the connection stayed open")
        self.assertEqual(bytes(client.bodies[slow]), b"done")
        self.assertIn(slow, client.ended)
        self.assertEqual(client.ended & set(late), set())
        self.assertEqual(sorted(app.paths), ["/echo", "/slow"])
        self.assertEqual(client.reset, dict.fromkeys(late, h2.errors.ErrorCodes.REFUSED_STREAM))

    async def test_streams_opened_after_retirings_goaway_are_refused_and_a_later_stop_keeps_its_last_stream_id(
        self,
    ) -> None:
        """
        After retiring()'s GOAWAY a new stream is refused with REFUSED_STREAM
        and never reaches the app; a shutdown() after it names no higher last
        stream id; the stream open before is answered, then the connection closes.
        """
        app = Held()
        self.addCleanup(app.release.set)
        target = WSGI(app, threads=2)
        port = tls_mux(self, target)
        client = await connect(self, port)
        slow = client.request("/slow")
        await until(lambda: app.running == 1, 5)
        target.retiring()
        self.assertTrue(await pump(client, lambda: client.goaway is not None, 5), "no GOAWAY")
        late = client.request("/hello")
        self.assertTrue(await pump(client, lambda: late in client.reset, 5), f"not refused: {client.events}")
        self.assertEqual(client.reset[late], h2.errors.ErrorCodes.REFUSED_STREAM)
        target.shutdown()
        app.release.set()
        self.assertTrue(await pump(client, lambda: client.closed, 5), "the connection stayed open")
        self.assertEqual(bytes(client.bodies[slow]), b"done")
        self.assertEqual(app.paths, ["/slow"])
        self.assertEqual([(g.error_code, g.last_stream_id) for g in client.goaways], [(0, slow)] * len(client.goaways))


class WSGIHTTP2FlowControlTests(unittest.TestCase):
    async def test_a_client_granting_a_large_window_that_does_not_read_pauses_a_streaming_response(self) -> None:
        """An HTTP/2 client that grants a 2 GiB window and reads nothing holds the app's iteration as over HTTP/1.1."""
        app = Streaming(1024)  # 64 MiB
        port = tls_mux(self, WSGI(app, threads=2))
        client = await connect(self, port, window=2**31 - 1)
        self.assertEqual(client.alpn, "h2")
        stream = client.request("/")
        await until(lambda: app.produced > 0, 5)
        await deferLater(R, 1.0, lambda: None)
        # The socket buffers of loopback hold a few MiB; nothing holds the rest.
        self.assertLess(app.produced, 160, f"{app.produced} chunks of 64 KiB produced for a client reading nothing")
        self.assertTrue(await pump(client, lambda: stream in client.ended, 30))
        self.assertEqual(len(client.bodies[stream]), 1024 * 65536)
        self.assertEqual(app.produced, 1024)

    async def test_many_streams_of_a_client_that_does_not_read_hold_their_apps(self) -> None:
        """Eight streams of a client granting 2 GiB windows and reading nothing hold their apps after a chunk or two."""
        app = Streaming(128)  # 8 MiB a stream
        port = tls_mux(self, WSGI(app, threads=8))
        client = await connect(self, port, window=2**31 - 1)
        streams = [client.request("/") for _ in range(8)]
        await until(lambda: app.produced >= 8, 5)
        await deferLater(R, 1.0, lambda: None)
        # The socket buffers of loopback hold a few MiB, twisted.web's HTTP/2 queue 64 KiB of each stream.
        self.assertLess(app.produced, 200, f"{app.produced} chunks of 64 KiB produced for a client reading nothing")
        self.assertTrue(await pump(client, lambda: all(s in client.ended for s in streams), 60))
        self.assertEqual([len(client.bodies[s]) for s in streams], [128 * 65536] * 8)
        self.assertEqual(app.produced, 8 * 128)
