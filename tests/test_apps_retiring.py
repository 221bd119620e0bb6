"""
WSGI and ASGI targets replaced by a reload (``IRetiringFactory.retiring``):
their idle keep-alive connections close at once, busy ones after their
answer, WebSockets go on, and the old target stops once its last connection
has ended. Real sockets on 127.0.0.1: a ``SniffingFactory`` whose rules are
set again, and real ``twistd muxtwist`` processes reloaded by SIGHUP.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import signal
import textwrap
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from twisted.trial import unittest

from muxtwist import Rule, SniffingFactory
from muxtwist.apps import WSGI, _wsgi_channel
from muxtwist.interfaces import IRetiringFactory
from muxtwist.matchers import HTTP1
from tests.test_aio import run_program
from tests.test_apps_examples import TWISTD_ASYNCIO
from tests.test_apps_http2 import connect as h2_connect
from tests.test_apps_http2 import pump, tls_mux
from tests.test_examples import CLIENT, Running
from tests.test_proxy_support import connect, mux, until


class Answering:
    """A WSGI app answering its ``word``; ``/slow`` only once ``release`` is set."""

    def __init__(self, word: bytes) -> None:
        self.word = word
        self.release = threading.Event()
        self.running = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., object]) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/slow":
            self.running += 1
            self.release.wait(10)
        body = self.word + (b" slow" if environ["PATH_INFO"] == "/slow" else b"")
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


class WSGIReloadTests(unittest.TestCase):
    def serve(self) -> tuple[int, Any, WSGI, Answering]:
        """A sniffing port whose one rule serves an :class:`Answering` app ``old`` through WSGI."""
        app = Answering(b"old")
        self.addCleanup(app.release.set)  # runs first: no request thread left waiting
        target = WSGI(app, threads=2)
        port, factory = mux(self, [Rule(HTTP1(), target, name="web")])
        return port, factory, target, app

    def test_wsgi_provides_the_retiring_hook(self) -> None:
        """WSGI targets provide IRetiringFactory, so the sniffer tells them when a reload leaves them out."""
        self.assertTrue(IRetiringFactory.providedBy(WSGI(Answering(b"x"))))

    async def test_a_reload_closes_an_idle_keep_alive_connection_and_stops_the_old_target(self) -> None:
        """A reload replacing the target closes an idle keep-alive client within a second; the old pool stops."""
        port, factory, old, _ = self.serve()
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(get("/"))
        await until(lambda: bytes(client.received).endswith(b"old"), 5)
        pool = old.pool
        self.assertTrue(pool.started)
        new = WSGI(Answering(b"new"), threads=2)
        started = time.monotonic()
        factory.set_rules([Rule(HTTP1(), new, name="web")])
        await until(lambda: client.eof.called, 1)
        closed_after = time.monotonic() - started
        # The old target's doStop follows its last connection: its pool stops, its threads end.
        await until(lambda: not pool.started, 5)
        await until(lambda: not [t for t in pool.threads if t.is_alive()], 5)
        self.assertLess(closed_after, 1.0)
        self.assertFalse(old.pool.started)
        # New connections reach the new target.
        fresh = await connect(self, port)
        assert fresh.transport is not None
        fresh.transport.write(get("/"))
        await until(lambda: bytes(fresh.received).endswith(b"new"), 5)

    async def test_a_reload_closes_an_idle_keep_alive_connection_behind_a_nested_sniffer(self) -> None:
        """A reload leaving out a nested SniffingFactory closes idle keep-alive clients of the WSGI target behind it."""
        app = Answering(b"old")
        self.addCleanup(app.release.set)
        old = WSGI(app, threads=2)
        port, factory = mux(self, [Rule(HTTP1(), SniffingFactory([Rule(HTTP1(), old, name="inner")]), name="web")])
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(get("/"))
        await until(lambda: bytes(client.received).endswith(b"old"), 5)
        pool = old.pool
        factory.set_rules([Rule(HTTP1(), WSGI(Answering(b"new"), threads=2), name="web")])
        await until(lambda: client.eof.called, 1)
        await until(lambda: not pool.started, 5)

    async def reload_after(self, sent: bytes, sniffing: bool) -> tuple[Any, Any, Any]:
        """A client that sent ``sent`` (still sniffing, or handed off), then a reload: client, factory, old pool."""
        port, factory, old, _ = self.serve()
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(sent)
        if sniffing:
            await until(lambda: any(p.sniffing for p in factory.connections), 5)
        else:
            await until(lambda: factory.connections and not any(p.sniffing for p in factory.connections), 5)
        pool = old.pool
        factory.set_rules([Rule(HTTP1(), WSGI(Answering(b"new"), threads=2), name="web")])
        return client, factory, pool

    async def answered_by_the_old_target_then_closed(self, client: Any, pool: Any) -> None:
        await until(lambda: client.eof.called, 5)
        answer = bytes(client.received)
        self.assertTrue(answer.endswith(b"\r\n\r\nold"), answer)
        self.assertIn(b"\r\nconnection: close\r\n", answer.lower())
        await until(lambda: not pool.started, 5)

    async def test_a_request_still_sniffing_at_a_reload_is_answered_by_the_old_target_then_closed(self) -> None:
        """A client whose request was half sent at a reload gets the old target's answer, Connection: close, and EOF."""
        client, _, pool = await self.reload_after(b"GET / HT", sniffing=True)
        client.transport.write(b"TP/1.1\r\nHost: x\r\n\r\n")
        await self.answered_by_the_old_target_then_closed(client, pool)

    async def test_a_request_whose_headers_are_partly_received_at_a_reload_is_answered_then_closed(self) -> None:
        """A request whose headers were partly received at a reload is answered, with Connection: close, then EOF."""
        client, _, pool = await self.reload_after(b"GET / HTTP/1.1\r\nHost: x\r\n", sniffing=False)
        client.transport.write(b"\r\n")
        await self.answered_by_the_old_target_then_closed(client, pool)

    async def test_a_request_whose_headers_stop_coming_after_a_reload_is_closed_after_the_grace(self) -> None:
        """A request whose headers stop coming after a reload is closed PARTIAL_REQUEST_GRACE seconds later."""
        self.patch(_wsgi_channel, "PARTIAL_REQUEST_GRACE", 0.3)
        client, _, pool = await self.reload_after(b"GET / HTTP/1.1\r\nHost: x\r\n", sniffing=False)
        started = time.monotonic()
        await until(lambda: client.eof.called, 5)
        self.assertGreaterEqual(time.monotonic() - started, 0.25)
        self.assertEqual(bytes(client.received), b"")
        await until(lambda: not pool.started, 5)

    async def test_a_request_handed_off_late_with_its_headers_partly_sent_is_answered_then_closed(self) -> None:
        """A request handed to the old target after a reload, its headers not all sent yet, is answered, then EOF."""
        client, factory, pool = await self.reload_after(b"GET / HT", sniffing=True)
        client.transport.write(b"TP/1.1\r\nHost: x\r\n")
        await until(lambda: not any(p.sniffing for p in factory.connections), 5)
        client.transport.write(b"\r\n")
        await self.answered_by_the_old_target_then_closed(client, pool)

    async def test_a_reload_lets_a_request_in_flight_answer_then_closes_its_connection(self) -> None:
        """A client mid-request when the target is replaced gets its whole answer, told Connection: close, then EOF."""
        port, factory, old, app = self.serve()
        busy = await connect(self, port)
        assert busy.transport is not None
        busy.transport.write(get("/slow"))
        await until(lambda: app.running == 1, 5)
        pool = old.pool
        factory.set_rules([Rule(HTTP1(), WSGI(Answering(b"new")), name="web")])
        self.assertFalse(busy.eof.called)
        self.assertTrue(pool.started, "the old pool stopped while a request ran on it")
        app.release.set()
        await until(lambda: busy.eof.called, 5)
        answer = bytes(busy.received)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK"), answer)
        self.assertTrue(answer.endswith(b"\r\n\r\nold slow"), answer)
        self.assertIn(b"\r\nconnection: close\r\n", answer.lower())
        await until(lambda: not pool.started, 5)

    async def test_a_target_named_again_after_a_reload_keeps_serving_keep_alive_clients(self) -> None:
        """A target left out by a reload and named again by the next serves keep-alive clients on the same pool."""
        port, factory, old, app = self.serve()
        busy = await connect(self, port)  # holds the old target running between the two reloads
        assert busy.transport is not None
        busy.transport.write(get("/slow"))
        await until(lambda: app.running == 1, 5)
        pool = old.pool
        factory.set_rules([Rule(HTTP1(), WSGI(Answering(b"new")), name="web")])
        factory.set_rules([Rule(HTTP1(), old, name="web")])
        client = await connect(self, port)
        assert client.transport is not None
        for n in (1, 2):  # two requests on one connection: nothing refused, kept alive
            client.transport.write(get("/"))
            await until(lambda n=n: bytes(client.received).count(b"old") == n, 5)  # type: ignore[misc]
        self.assertFalse(client.eof.called)
        self.assertIs(old.pool, pool)
        self.assertTrue(pool.started)
        app.release.set()
        await until(lambda: bytes(busy.received).endswith(b"old slow"), 5)

    async def test_retiring_sends_goaway_to_an_idle_http2_connection_and_keeps_serving(self) -> None:
        """retiring() gives an idle HTTP/2 client a GOAWAY and EOF within a second; a new client is served after it."""
        target = WSGI(Answering(b"old"), threads=2)
        port = tls_mux(self, target)
        idle = await h2_connect(self, port)
        self.assertEqual(idle.alpn, "h2")
        stream = idle.request("/")
        self.assertTrue(await pump(idle, lambda: stream in idle.ended, 5))
        target.retiring()
        self.assertTrue(await pump(idle, lambda: idle.closed, 1), "the idle HTTP/2 connection stayed open")
        self.assertIsNotNone(idle.goaway)
        self.assertEqual(idle.goaway.last_stream_id, stream)
        self.assertTrue(target.pool.started)
        again = await h2_connect(self, port)
        stream = again.request("/")
        self.assertTrue(await pump(again, lambda: stream in again.ended, 5))
        self.assertEqual(bytes(again.bodies[stream]), b"old")


WSGI_RULES = """\
from flask import Flask

from muxtwist import Rule
from muxtwist.apps import WSGI
from muxtwist.matchers import HTTP1

web = Flask("web")


@web.route("/")
def hello():
    return "{word}\\n"


rules = [Rule(HTTP1(), WSGI(web, threads=2), name="web")]
"""

ASGI_RULES = """\
from twisted.logger import Logger

from muxtwist import Rule
from muxtwist.apps import ASGI
from muxtwist.matchers import HTTP1

log = Logger(namespace="rules")
WORD = "{word}"


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                log.info("lifespan startup {{word}}", word=WORD)
                await send({{"type": "lifespan.startup.complete"}})
            else:
                log.info("lifespan shutdown {{word}}", word=WORD)
                await send({{"type": "lifespan.shutdown.complete"}})
                return
    elif scope["type"] == "http":
        body = (WORD + "\\n").encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({{"type": "http.response.start", "status": 200, "headers": headers}})
        await send({{"type": "http.response.body", "body": body}})
    else:
        await receive()
        await send({{"type": "websocket.accept"}})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({{"type": "websocket.send", "text": WORD + ": " + message["text"]}})


rules = [Rule(HTTP1(), ASGI(app, timeout_keep_alive=60), name="web")]
"""


def idle_keep_alive(port: int) -> tuple[http.client.HTTPConnection, bytes]:
    """An http.client connection that made one request (its answer read) and stays open."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT)
    connection.request("GET", "/")
    response = connection.getresponse()
    body = response.read()
    assert not response.will_close, response.getheaders()
    return connection, body


def seconds_until_closed(connection: http.client.HTTPConnection, seconds: float) -> float | None:
    """How long until the server closes ``connection`` (reading nothing else), or None if it stays open."""
    sock = connection.sock
    assert sock is not None
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        data = sock.recv(1)
    except TimeoutError:
        return None
    except ConnectionResetError:
        data = b""
    assert data == b"", data
    return time.monotonic() - started


class TwistdReloadTests(unittest.TestCase):
    """A real ``twistd -n muxtwist --config rules.py`` whose target a SIGHUP replaces."""

    def start(self, command: list[str], rules: str) -> tuple[Running, int, str]:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "rules.py")
        with open(path, "w") as f:
            f.write(rules.format(word="one"))
        running = Running([*command, "--port", "tcp:0:interface=127.0.0.1", "--config", path])
        self.addCleanup(running.kill)  # its process group
        (port,) = running.listening_ports()
        return running, port, path

    def reload(self, running: Running, path: str, rules: str) -> None:
        with open(path, "w") as f:
            f.write(rules.format(word="two"))
        running.process.send_signal(signal.SIGHUP)
        running.wait_for(rb"reloaded .*rules\.py")

    def test_sighup_closes_an_idle_keep_alive_connection_to_the_replaced_wsgi_target(self) -> None:
        """An idle http.client connection to a Flask target is closed within a second of the reload replacing it."""
        command = [arg for arg in TWISTD_ASYNCIO if arg != "--reactor=asyncio"]
        running, port, path = self.start(command, WSGI_RULES)
        idle, body = idle_keep_alive(port)
        self.addCleanup(idle.close)
        self.assertEqual(body, b"one\n")
        self.reload(running, path, WSGI_RULES)
        self.closed_then_served_anew(idle, port, b"two\n")
        self.assertEqual(running.stop(), 0, running.output.decode(errors="replace"))

    def test_sighup_closes_idle_http_to_the_replaced_asgi_target_and_its_websocket_goes_on(self) -> None:
        """
        After a reload replaces an ASGI target, its idle keep-alive HTTP
        client is closed within a second, its WebSocket goes on talking to
        it, and its lifespan shutdown runs once that WebSocket has closed.
        """
        from websockets.sync.client import connect as ws_connect

        running, port, path = self.start(TWISTD_ASYNCIO, ASGI_RULES)
        running.wait_for(rb"lifespan startup one")
        with ws_connect(f"ws://127.0.0.1:{port}/ws", open_timeout=CLIENT, close_timeout=CLIENT) as ws:
            self.talk_through_a_reload(running, port, path, ws)
        self.assertEqual(ws.close_code, 1000)
        running.wait_for(rb"lifespan shutdown one")
        self.assertEqual(running.stop(), 0, running.output.decode(errors="replace"))

    def closed_then_served_anew(self, idle: Any, port: int, answer: bytes) -> None:
        """The idle keep-alive connection closes within a second; a new client gets ``answer`` (the new target)."""
        closed = seconds_until_closed(idle, 2.0)
        self.assertIsNotNone(closed, "the idle keep-alive connection stayed open after the reload")
        assert closed is not None
        self.assertLess(closed, 1.0)
        fresh, body = idle_keep_alive(port)
        fresh.close()
        self.assertEqual(body, answer)

    def talk_through_a_reload(self, running: Running, port: int, path: str, ws: Any) -> None:
        ws.send("a")
        self.assertEqual(ws.recv(CLIENT), "one: a")
        idle, body = idle_keep_alive(port)
        self.addCleanup(idle.close)
        self.assertEqual(body, b"one\n")
        self.reload(running, path, ASGI_RULES)
        running.wait_for(rb"lifespan startup two")
        self.closed_then_served_anew(idle, port, b"two\n")
        # The WebSocket still talks to the old application, whose lifespan has not ended.
        ws.send("b")
        self.assertEqual(ws.recv(CLIENT), "one: b")
        deadline = time.monotonic() + 0.5
        while running._read(deadline) and time.monotonic() < deadline:
            pass  # what it has logged so far
        self.assertNotIn(b"lifespan shutdown one", running.output)


#: What the ASGI reload programs share (after tests/test_aio.py's PRELUDE):
#: an application answering its word, whose lifespan startup may wait for
#: ``startup_may_finish``, logging its startup, requests and shutdown in
#: ``events``; a service listening without waiting for that startup; a reload.
ASGI_RELOAD = """
import time
from muxtwist import SniffingFactory
from muxtwist.apps import _asgi
from muxtwist.service import MuxService

events = []
startup_may_finish = asyncio.Event()

def answering(word, slow_startup=False):
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            await receive()
            if slow_startup:
                await startup_may_finish.wait()
            events.append("startup " + word)
            await send({"type": "lifespan.startup.complete"})
            await receive()
            events.append("shutdown " + word)
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            while (message := await receive())["type"] != "websocket.disconnect":
                await send({"type": "websocket.send", "text": word + ": " + message["text"]})
            return
        events.append("request " + word)
        body = word.encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    return app

def target(word, slow_startup=False, **options):
    options.setdefault("http", HTTP)  # uvicorn's HTTP/1.1 protocol class: HTTP is set by the test
    return ASGI(answering(word, slow_startup), timeout_keep_alive=60, **options)

def listen(first, shutdown_timeout=5):
    reactor = muxtwist.aio.install_reactor()
    factory = SniffingFactory([Rule(HTTP1(), first, name="web")], reactor=reactor)
    service = MuxService(shutdown_timeout=shutdown_timeout, reactor=reactor)
    service.add_listener("tcp:0:interface=127.0.0.1", factory)
    service.privilegedStartService()
    service.startService()
    return muxtwist.aio.Server(service, factory)

async def until(test, seconds=5):
    deadline = time.monotonic() + seconds
    while not test():
        if time.monotonic() > deadline:
            raise TimeoutError("still waiting after %s s" % seconds)
        await asyncio.sleep(0.01)

async def handed_off(server):
    await until(lambda: server.factory.connections and not any(p.sniffing for p in server.factory.connections))

async def sniffing(server):
    await until(lambda: any(p.sniffing for p in server.factory.connections))

def reload(server, word="new"):
    server.factory.set_rules([Rule(HTTP1(), target(word), name="web")])

async def rest(reader, seconds=3):
    # What the server sends until it closes, and after how many seconds (None: still open).
    started, data = time.monotonic(), b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), max(0.01, started + seconds - time.monotonic())):
            data += chunk
    except asyncio.TimeoutError:
        return data.decode(), None
    except ConnectionResetError:
        return data.decode() + "<reset>", time.monotonic() - started
    return data.decode(), time.monotonic() - started

GET = b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n"

async def connected(server, sent):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(sent)
    return reader, writer

async def served(sent, word="app", **options):
    # A server whose one target answers word, its lifespan started, and a
    # connection to it that has sent ``sent``.
    server = listen(target(word, **options))
    await server.started()
    reader, writer = await connected(server, sent)
    return server, reader, writer

def tell(**measured):
    # The program's answer to the test (its last line): what it measured, and the applications' events.
    print(json.dumps({**measured, "events": events}))

async def answered_after_reload(server, reader, writer):
    # What the old target sends until it closes; once it has, its lifespan
    # shutdown awaited (it follows its last connection); then tell().
    answer, closed_after = await rest(reader)
    if closed_after is not None:
        await until(lambda: "shutdown old" in events)
    writer.close()
    await server.close()
    tell(answer=answer, closed_after=closed_after)

async def answered_at_stop(server, reader, writer, meanwhile):
    # The stop begun (server.close), then meanwhile() done; what the target
    # sends until it closes, the stop awaited; then tell(), with the seconds
    # the stop took.
    started = time.monotonic()
    closing = asyncio.ensure_future(server.close())
    await asyncio.sleep(0)
    meanwhile()
    answer, closed_after = await rest(reader)
    await closing
    took = time.monotonic() - started
    writer.close()
    tell(answer=answer, closed_after=closed_after, took=took)
"""


class ASGIPrograms(unittest.TestCase):
    """
    What the tests of an ASGI target asked to finish share: each runs an
    asyncio program in a child process (tests/test_aio.py's
    ``run_program``), the asyncio reactor there, its targets built with
    uvicorn's HTTP/1.1 protocol class ``http`` (``"auto"``: httptools when
    it is installed, else h11).
    """

    http = "auto"
    #: What a subclass's programs add to ``ASGI_RELOAD``.
    helpers = ""

    def run_asgi(self, body: str) -> dict[str, Any]:
        """Run ``body`` (after ``ASGI_RELOAD`` and ``helpers``), which defines ``async def main()``; what it tells."""
        program = ASGI_RELOAD + f"HTTP = {self.http!r}\n" + self.helpers + textwrap.dedent(body)
        return run_program(self, program + "\nasyncio.run(main())\n")

    def assert_answered_then_closed(self, got: dict[str, Any], word: str) -> None:
        """The client got the whole answer ``word``, then EOF within two seconds."""
        self.assertTrue(got["answer"].startswith("HTTP/1.1 200 OK\r\n"), got)
        self.assertTrue(got["answer"].endswith("\r\n\r\n" + word), got["answer"])
        self.assertIsNotNone(got["closed_after"], f"still open 3 s later: {got}")
        self.assertLess(got["closed_after"], 2.0, got)

    def assert_old_answered_then_closed(self, got: dict[str, Any]) -> None:
        """The retired target answered (assert_answered_then_closed), then its lifespan shutdown ran."""
        self.assert_answered_then_closed(got, "old")
        self.assertIn("shutdown old", got["events"])


class ASGIFinishTests(ASGIPrograms):
    """
    An ASGI target asked to finish (``retiring()`` at a reload, or its stop)
    while connections wait for its lifespan startup.
    """

    def test_a_connection_waiting_for_the_startup_at_a_reload_is_answered_then_closed(self) -> None:
        """A request waiting for the lifespan startup when a reload retires the target is answered, then EOF."""
        got = self.run_asgi(
            """
            async def main():
                server = listen(target("old", slow_startup=True))
                reader, writer = await connected(server, GET)
                await handed_off(server)
                reload(server)
                startup_may_finish.set()
                await answered_after_reload(server, reader, writer)
            """
        )
        self.assert_answered_then_closed(got, "old")
        events = got["events"]
        self.assertLess(events.index("startup old"), events.index("request old"))
        self.assertLess(events.index("request old"), events.index("shutdown old"))

    def test_a_connection_waiting_for_the_startup_at_a_stop_is_answered_before_the_lifespan_shutdown(self) -> None:
        """A request waiting for the startup when the target stops is answered and closed, then the lifespan ends."""
        got = self.run_asgi(
            """
            async def main():
                server = listen(target("app", slow_startup=True, shutdown_timeout=5))
                reader, writer = await connected(server, GET)
                await handed_off(server)
                await answered_at_stop(server, reader, writer, startup_may_finish.set)
            """
        )
        self.assert_answered_then_closed(got, "app")
        self.assertEqual(got["events"], ["startup app", "request app", "shutdown app"])
        self.assertLess(got["took"], 2.0)

    def test_a_connection_waiting_for_a_startup_the_stop_gives_up_is_closed_unserved(self) -> None:
        """A connection waiting for a startup that outlasts the stop's shutdown_timeout is closed then, never served."""
        got = self.run_asgi(
            """
            async def main():
                server = listen(target("app", slow_startup=True, shutdown_timeout=0.3))
                reader, writer = await connected(server, GET)
                await handed_off(server)
                closing = asyncio.ensure_future(server.close())
                answer, closed_after = await rest(reader)
                await closing
                startup_may_finish.set()  # too late: nothing is served after the stop
                await until(lambda: "startup app" in events)
                await asyncio.sleep(0.2)  # a request it started would have reached the app by now
                writer.close()
                tell(answer=answer, closed_after=closed_after)
            """
        )
        self.assertEqual(got["answer"], "")
        self.assertIsNotNone(got["closed_after"], "still open 3 s after the stop")
        self.assertLess(got["closed_after"], 2.0)
        self.assertNotIn("request app", got["events"])

    def test_a_websocket_waiting_for_the_startup_at_a_reload_goes_on(self) -> None:
        """A WebSocket handshake waiting for the startup when a reload retires the target is accepted and goes on."""
        got = self.run_asgi(
            """
            from websockets.asyncio.client import connect as ws_connect
            async def main():
                server = listen(target("old", slow_startup=True))
                opening = asyncio.ensure_future(ws_connect(f"ws://127.0.0.1:{server.port}/ws", open_timeout=5))
                await handed_off(server)
                reload(server)
                startup_may_finish.set()
                ws = await opening
                await ws.send("a")
                first = await asyncio.wait_for(ws.recv(), 5)
                await asyncio.sleep(0.2)  # what a close after the handshake would have taken
                await ws.send("b")
                second = await asyncio.wait_for(ws.recv(), 5)
                await ws.close()
                await until(lambda: "shutdown old" in events)
                await server.close()
                tell(said=[first, second])
            """
        )
        self.assertEqual(got["said"], ["old: a", "old: b"])
        self.assertIn("shutdown old", got["events"])


class ASGIPartialRequestFinishTests(ASGIPrograms):
    """
    An ASGI target asked to finish (``retiring()`` at a reload, or its stop)
    while a request's headers are still coming, with uvicorn's h11 protocol.
    """

    http = "h11"

    def test_a_request_whose_headers_are_partly_received_at_a_reload_is_answered_then_closed(self) -> None:
        """A request whose headers were partly received when a reload retires the target is answered, then EOF."""
        got = self.run_asgi(
            """
            async def main():
                server, reader, writer = await served(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n", "old")
                await handed_off(server)
                reload(server)
                writer.write(b"User-Agent: test\\r\\n\\r\\n")
                await answered_after_reload(server, reader, writer)
            """
        )
        self.assert_old_answered_then_closed(got)
        self.assertIn("request old", got["events"])

    def test_a_request_whose_headers_stop_coming_after_a_reload_is_closed_after_the_grace(self) -> None:
        """A request whose headers stop coming after a reload is closed PARTIAL_REQUEST_GRACE seconds later."""
        got = self.run_asgi(
            """
            _asgi.PARTIAL_REQUEST_GRACE = 0.5
            async def main():
                server, reader, writer = await served(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n", "old")
                await handed_off(server)
                reload(server)
                await asyncio.sleep(0.3)
                writer.write(b"User-Agent: test\\r\\n")  # a byte within the grace starts it again
                await answered_after_reload(server, reader, writer)
            """
        )
        self.assertEqual(got["answer"], "")
        self.assertIsNotNone(got["closed_after"], "still open 3 s after the reload")
        self.assertGreater(got["closed_after"], 0.4)
        self.assertLess(got["closed_after"], 2.0)
        self.assertNotIn("request old", got["events"])
        self.assertIn("shutdown old", got["events"])

    def test_a_request_handed_off_late_with_its_headers_partly_sent_is_answered_then_closed(self) -> None:
        """A request handed to the old target after a reload, its headers not all sent yet, is answered, then EOF."""
        got = self.run_asgi(
            """
            async def main():
                server, reader, writer = await served(b"GET / HT", "old")
                await sniffing(server)
                reload(server)
                writer.write(b"TP/1.1\\r\\nHost: x\\r\\n")
                await until(lambda: not any(p.sniffing for p in server.factory.connections))
                writer.write(b"\\r\\n")
                await answered_after_reload(server, reader, writer)
            """
        )
        self.assert_old_answered_then_closed(got)

    def test_a_second_request_partly_received_at_a_reload_is_answered_then_closed(self) -> None:
        """On a keep-alive connection, a next request partly received at a reload is answered, then EOF."""
        got = self.run_asgi(
            """
            async def main():
                # One write: the next request's first headers arrive with the first request.
                server, reader, writer = await served(GET + b"GET /again HTTP/1.1\\r\\nHost: x\\r\\n", "old")
                await asyncio.wait_for(reader.readuntil(b"old"), 5)
                reload(server)
                writer.write(b"\\r\\n")
                answer, closed_after = await rest(reader)
                writer.close()
                await server.close()
                tell(answer=answer, closed_after=closed_after)
            """
        )
        self.assert_answered_then_closed(got, "old")
        self.assertEqual(got["events"].count("request old"), 2)

    def test_a_request_whose_headers_are_partly_received_at_a_stop_is_answered_then_closed(self) -> None:
        """A request whose headers were partly received when the target stops is answered before its lifespan ends."""
        got = self.run_asgi(
            """
            async def main():
                server, reader, writer = await served(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n")
                await handed_off(server)
                await answered_at_stop(server, reader, writer, lambda: writer.write(b"\\r\\n"))
            """
        )
        self.assert_answered_then_closed(got, "app")
        self.assertEqual(got["events"], ["startup app", "request app", "shutdown app"])


class ASGIPartialRequestFinishHttpToolsTests(ASGIPartialRequestFinishTests):
    """The same with uvicorn's httptools protocol (what it picks when httptools is installed)."""

    http = "httptools"
    skip = None if importlib.util.find_spec("httptools") else "httptools is not installed (pip install -e '.[test]')"
