"""
The in-process application targets under hostile or unusual clients and
setups, over real loopback sockets: what a client does at the edges of a
request (a half-close right after it) must not cost it the answer, and a
protocol that cannot run under the reactor in use says so instead of hanging.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterable

from twisted.trial import unittest

from muxtwist import Rule
from muxtwist.apps import WSGI
from muxtwist.matchers import HTTP1
from tests.test_apps_twistd import TWISTD_DEFAULT
from tests.test_examples import Running
from tests.test_proxy_support import connect, mux, wait


def slow_hello(environ: dict[str, object], start_response: Callable[..., object]) -> Iterable[bytes]:
    """A WSGI app that answers after a moment on its thread, so the client's FIN arrives first."""
    time.sleep(0.2)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
    return [b"hello\n"]


class WSGIHalfCloseTests(unittest.TestCase):
    def setUp(self) -> None:
        self.port, self.factory = mux(self, [Rule(HTTP1(), WSGI(slow_hello, threads=2), name="wsgi")])
        self.factory.doStart()
        self.addCleanup(self.factory.doStop)

    async def test_wsgi_answers_a_client_that_half_closes_after_its_request(self) -> None:
        """A client that shuts its write side after sending a request still gets the response, then the close."""
        client = await connect(self, self.port)
        assert client.transport is not None
        client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        client.transport.loseWriteConnection()  # type: ignore[attr-defined]
        await wait(client.lost, 10)
        self.assertTrue(bytes(client.received).startswith(b"HTTP/1.1 200 OK\r\n"), bytes(client.received))
        self.assertTrue(bytes(client.received).endswith(b"\r\n\r\nhello\n"), bytes(client.received))

    async def test_wsgi_answers_pipelined_requests_sent_before_a_half_close(self) -> None:
        """Two pipelined requests followed by a half-close both get their responses before the close."""
        client = await connect(self, self.port)
        assert client.transport is not None
        client.transport.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        client.transport.loseWriteConnection()  # type: ignore[attr-defined]
        await wait(client.lost, 10)
        self.assertEqual(bytes(client.received).count(b"HTTP/1.1 200 OK\r\n"), 2, bytes(client.received))

    async def test_wsgi_closes_at_once_on_a_half_close_with_no_complete_request(self) -> None:
        """A half-close in the middle of a request's headers closes the connection without waiting for a timeout."""
        client = await connect(self, self.port)
        assert client.transport is not None
        client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        client.transport.loseWriteConnection()  # type: ignore[attr-defined]
        await wait(client.lost, 5)
        self.assertEqual(bytes(client.received), b"")


STREAMS_RULES = """\
import asyncio

from muxtwist import Rule
from muxtwist.apps import AsyncioProtocol
from muxtwist.matchers import Prefix


async def shout(reader, writer):
    while line := await reader.readline():
        writer.write(line.upper())
        await writer.drain()
    writer.close()


def shouting():
    return asyncio.StreamReaderProtocol(asyncio.StreamReader(), shout)


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


rules = [
    Rule(Prefix(b"SHOUT"), AsyncioProtocol(shouting), name="shout"),
    Rule(Prefix(b"ECHO"), AsyncioProtocol(Echo), name="echo"),
]
"""


def exchange(port: int, payload: bytes, seconds: float = 5.0) -> tuple[bytes, bool]:
    """Send ``payload``, read until the server closes: (what came back, whether it closed within ``seconds``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as s:
        s.sendall(payload)
        received = b""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                return received, False
            if not chunk:
                return received, True
            received += chunk
            if received.endswith(payload):
                return received, False
        return received, False


class StreamsOnTheDefaultReactorTests(unittest.TestCase):
    def test_stream_protocol_under_the_default_reactor_is_closed_with_an_error(self) -> None:
        """Under the default reactor a streams protocol's connection closes with a clear error, not a silent hang."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        rules = os.path.join(directory, "rules.py")
        with open(rules, "w") as f:
            f.write(STREAMS_RULES)
        running = Running([*TWISTD_DEFAULT, "--port", "tcp:0:interface=127.0.0.1", "--config", rules])
        self.addCleanup(running.kill)
        (port,) = running.listening_ports()
        self.assertEqual(exchange(port, b"ECHO one\n"), (b"ECHO one\n", False))
        received, closed = exchange(port, b"SHOUT hello\n")
        self.assertEqual((received, closed), (b"", True))
        running.wait_for(rb"built an asyncio.StreamReaderProtocol, which needs Twisted's asyncio reactor")
        self.assertEqual(running.stop(), 0, running.output.decode(errors="replace"))


LIFESPAN_RULES = """\
from muxtwist import Rule
from muxtwist.apps import ASGI
from muxtwist.matchers import HTTP1

VERSION = {version!r}
FAIL = {fail!r}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if FAIL:
                    await send({{"type": "lifespan.startup.failed", "message": "no database"}})
                else:
                    await send({{"type": "lifespan.startup.complete"}})
            elif message["type"] == "lifespan.shutdown":
                await send({{"type": "lifespan.shutdown.complete"}})
                return
        return
    body = VERSION.encode()
    await send({{"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]}})
    await send({{"type": "http.response.body", "body": body}})


rules = [Rule(HTTP1(), ASGI(app, lifespan="on"), name="web")]
"""


def http_get(port: int) -> bytes:
    """The body of GET / on 127.0.0.1:port (HTTP/1.0, read to the close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer.partition(b"\r\n\r\n")[2]


class ReloadToAFailingAppTests(unittest.TestCase):
    def test_a_reload_whose_app_fails_its_startup_keeps_the_running_app(self) -> None:
        """A SIGHUP to rules whose ASGI app fails its lifespan startup keeps the old app; a good one then takes over."""
        from tests.test_apps_examples import TWISTD_ASYNCIO

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        rules = os.path.join(directory, "rules.py")

        def write(version: str, fail: bool) -> None:
            with open(rules, "w") as f:
                f.write(LIFESPAN_RULES.format(version=version, fail=fail))

        write("one", False)
        running = Running([*TWISTD_ASYNCIO, "--port", "tcp:0:interface=127.0.0.1", "--config", rules])
        self.addCleanup(running.kill)
        (port,) = running.listening_ports()
        self.assertEqual(http_get(port), b"one")
        write("two", True)
        running.process.send_signal(signal.SIGHUP)
        running.wait_for(rb"reload failed, keeping the running rules: ASGI\(app.*failed its startup")
        self.assertEqual(http_get(port), b"one")
        write("three", False)
        running.process.send_signal(signal.SIGHUP)
        running.wait_for(rb"reloaded " + rules.encode())
        self.assertEqual(http_get(port), b"three")
        self.assertEqual(running.stop(), 0, running.output.decode(errors="replace"))
