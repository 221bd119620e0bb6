"""
WSGI: a Flask application served in-process on a bounded thread pool, with
curl as the client, next to another rule the reactor keeps serving.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from flask import Flask
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.trial import unittest

from muxtwist import Rule
from muxtwist._options import OptionError
from muxtwist.apps import WSGI
from muxtwist.apps._wsgi_pacing import _Gate, _paced_body
from muxtwist.default import Echo
from muxtwist.matchers import HTTP1, Prefix
from tests.processes import stop_group
from tests.test_proxy_support import R, connect, mux, run, until, wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SlowApp:
    """A Flask app whose /slow requests wait for ``release``, counting how many run at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.threads: set[str] = set()
        self.flask = Flask("slow")
        self.flask.add_url_rule("/slow", "slow", self.slow)
        self.flask.add_url_rule("/hello", "hello", lambda: "hello from flask")

    def slow(self) -> str:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.add(threading.current_thread().name)
        try:
            self.release.wait(10)
        finally:
            with self.lock:
                self.running -= 1
        return "done"


class WSGITests(unittest.TestCase):
    def setUp(self) -> None:
        self.app = SlowApp()
        self.target = WSGI(self.app.flask, threads=2)
        self.port, self.factory = mux(
            self,
            [Rule(HTTP1(), self.target, name="flask"), Rule(Prefix(b"ECHO"), Factory.forProtocol(Echo), name="echo")],
        )
        self.factory.doStart()
        self.addCleanup(self.factory.doStop)
        # Runs first: no request thread is left waiting when the pool stops.
        self.addCleanup(self.app.release.set)

    def curl(self, path: str) -> defer.Deferred[tuple[bytes, bytes, int]]:
        url = f"http://127.0.0.1:{self.port}{path}"
        return defer.Deferred.fromCoroutine(run(["curl", "-sS", "--max-time", "20", url], seconds=25))

    async def test_flask_answers_through_the_sniffer(self) -> None:
        """curl gets the Flask response through the HTTP1 rule."""
        out, err, code = await self.curl("/hello")
        self.assertEqual((code, out), (0, b"hello from flask"), err)

    async def test_slow_requests_are_bounded_by_the_pool_and_the_reactor_stays_responsive(self) -> None:
        """Five slow requests run at most two at a time, and an echo client is served while they wait."""
        requests = [self.curl("/slow") for _ in range(5)]
        await until(lambda: self.app.running == 2, 15)
        # The reactor is not blocked by the application: another rule answers at once.
        client = await connect(self, self.port)
        assert client.transport is not None
        client.transport.write(b"ECHO ping")
        self.assertEqual(await client.received_at_least(9, 5), b"ECHO ping")
        self.assertEqual(self.app.running, 2)
        # The other three wait for a thread (each once its curl has connected and sent, on a busy machine later).
        await until(lambda: self.target.pool.q.qsize() == 3, 15)
        self.assertEqual(self.app.running, 2)
        self.app.release.set()
        results = await wait(defer.gatherResults(requests), 30)
        self.assertEqual([(code, out) for out, _, code in results], [(0, b"done")] * 5)
        self.assertEqual(self.app.most, 2)
        self.assertLessEqual(len(self.app.threads), 2)

    async def test_pool_starts_and_stops_with_the_factory(self) -> None:
        """The thread pool runs while the factory is started and is stopped with it."""
        self.assertTrue(self.target.pool.started)
        out, _, code = await self.curl("/hello")
        self.assertEqual(code, 0)
        pool = self.target.pool
        self.factory.doStop()  # the cleanup's port stop makes the last one
        self.factory.doStop()
        await until(lambda: not pool.started, 5)
        await until(lambda: not [t for t in pool.threads if t.is_alive()], 5)
        self.assertIsNot(self.target.pool, pool)
        self.factory.doStart()
        self.factory.doStart()
        self.assertTrue(self.target.pool.started)

    async def test_stopping_with_a_request_in_flight_does_not_block_the_reactor(self) -> None:
        """Stopping the target while a request thread runs returns at once, and the request still gets its response."""
        release, abandoned = threading.Event(), threading.Event()

        def held(environ: dict[str, object], start_response: Callable[..., object]) -> list[bytes]:
            if not release.wait(10) or abandoned.is_set():
                raise RuntimeError("abandoned: stopping the target waited for this request")
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"done"]

        target = WSGI(held, threads=1)
        port, factory = mux(self, [Rule(HTTP1(), target, name="held")])
        factory.doStart()
        self.addCleanup(factory.doStop)
        self.addCleanup(release.set)
        url = f"http://127.0.0.1:{port}/"
        response = defer.Deferred.fromCoroutine(run(["curl", "-sS", "--max-time", "20", url], seconds=25))
        await until(lambda: len(target.pool.working) == 1, 15)
        pool = target.pool
        # A target that blocked here until the thread ended would never see it end (the thread
        # needs the reactor to write): the watchdog fails the request instead, from another thread.
        watchdog = threading.Timer(5, lambda: (abandoned.set(), release.set()))
        watchdog.start()
        self.addCleanup(watchdog.cancel)
        target.doStop()
        self.assertFalse(abandoned.is_set(), "doStop waited for the request thread")
        release.set()
        out, err, code = await response
        self.assertEqual((code, out), (0, b"done"), err)
        await until(lambda: not [t for t in pool.threads if t.is_alive()], 5)

    def test_threads_must_be_positive(self) -> None:
        """threads=0 is a clear ValueError."""
        with self.assertRaises(ValueError):
            WSGI(self.app.flask, threads=0)

    def test_process_exits_after_stop_while_a_request_thread_never_returns(self) -> None:
        """A request thread still running when the service stops does not keep the process from exiting."""
        program = textwrap.dedent(
            """
            import socket, threading, time
            from twisted.internet import reactor
            from muxtwist import Rule, SniffingFactory
            from muxtwist.apps import WSGI
            from muxtwist.matchers import HTTP1
            from muxtwist.service import MuxService

            running = threading.Event()
            def app(environ, start_response):
                running.set()
                time.sleep(3600)

            service = MuxService(shutdown_timeout=0.2, reactor=reactor)
            service.add_listener("tcp:0:interface=127.0.0.1", SniffingFactory([Rule(HTTP1(), WSGI(app, threads=2))]))

            def client():
                port = next(iter(service.listeners.values())).port.getHost().port
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
                running.wait(10)
                reactor.callFromThread(lambda: service.stopService().addBoth(lambda _: reactor.stop()))

            def start():
                service.privilegedStartService()
                service.startService()
                threading.Thread(target=client, daemon=True).start()

            reactor.callWhenRunning(start)
            reactor.run()
            print("reactor stopped", flush=True)
            """
        )
        env = dict(os.environ, PYTHONPATH=ROOT)
        process = subprocess.Popen(
            [sys.executable, "-c", program],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        self.addCleanup(stop_group, process)
        started = time.monotonic()
        try:
            out, err = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            stop_group(process)
            out, err = process.communicate()
            self.fail(f"still running 20 s after it stopped: {out!r} {err[-2000:]!r}")
        self.assertEqual(out, b"reactor stopped\n", err[-2000:])
        self.assertEqual(process.returncode, 0, err[-2000:])
        self.assertLess(time.monotonic() - started, 20)


class Streaming:
    """A WSGI app streaming ``chunks`` chunks of 64 KiB, counting how many it has produced."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self.produced = 0
        self.closed = threading.Event()

    def __call__(self, environ: dict[str, object], start_response: Callable[..., object]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Length", str(self.chunks * 65536))])
        return self.body()

    def body(self) -> Iterator[bytes]:
        try:
            for _ in range(self.chunks):
                self.produced += 1
                yield b"x" * 65536
        finally:
            self.closed.set()


class WSGIFlowControlTests(unittest.TestCase):
    async def paused_client(self, app: Streaming) -> Any:
        """A client that asked ``app`` (behind a 2-thread WSGI target) for its body and reads nothing; once it began."""
        port, factory = mux(self, [Rule(HTTP1(), WSGI(app, threads=2), name="wsgi")])
        factory.doStart()
        self.addCleanup(factory.doStop)
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.pauseProducing()  # type: ignore[attr-defined]
        client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await until(lambda: app.produced > 0, 5)
        return client

    async def test_a_slow_reader_pauses_a_streaming_response(self) -> None:
        """A client that does not read holds the application's iteration once the connection's buffers are full."""
        app = Streaming(1024)  # 64 MiB
        client = await self.paused_client(app)
        await deferLater(R, 1.0, lambda: None)
        # The socket buffers of loopback hold a few MiB; nothing holds the rest.
        self.assertLess(app.produced, 160, f"{app.produced} chunks of 64 KiB produced for a client reading nothing")
        client.transport.resumeProducing()  # type: ignore[attr-defined]
        await until(lambda: len(client.received) >= 1024 * 65536, 30)
        self.assertTrue(bytes(client.received[:20]).startswith(b"HTTP/1.1 200 OK"))
        self.assertEqual(app.produced, 1024)

    async def test_a_reader_that_leaves_while_paused_ends_the_iteration(self) -> None:
        """A client that leaves while the response is paused frees the app's thread, which closes its iterable."""
        app = Streaming(1024)
        client = await self.paused_client(app)
        await deferLater(R, 0.5, lambda: None)
        client.transport.abortConnection()  # type: ignore[attr-defined]
        await until(app.closed.is_set, 5)
        self.assertLess(app.produced, 1024)


class WSGIShutdownTests(unittest.TestCase):
    async def test_shutdown_closes_idle_keep_alive_connections_and_lets_busy_ones_answer(self) -> None:
        """shutdown() closes an idle keep-alive connection at once and a busy one right after its response."""
        app = SlowApp()
        self.addCleanup(app.release.set)
        target = WSGI(app.flask, threads=2)
        port, factory = mux(self, [Rule(HTTP1(), target, name="wsgi")])
        factory.doStart()
        self.addCleanup(factory.doStop)
        idle = await connect(self, port)
        busy = await connect(self, port)
        assert idle.transport is not None and busy.transport is not None
        idle.transport.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        await until(lambda: bytes(idle.received).endswith(b"hello from flask"), 5)
        busy.transport.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await until(lambda: app.running == 1, 5)
        target.shutdown()
        await until(lambda: idle.eof.called or idle.lost.called, 1)
        self.assertFalse(busy.eof.called or busy.lost.called)
        app.release.set()
        await until(lambda: busy.eof.called or busy.lost.called, 5)
        self.assertTrue(bytes(busy.received).startswith(b"HTTP/1.1 200 OK"), bytes(busy.received))
        self.assertTrue(bytes(busy.received).endswith(b"done"), bytes(busy.received))


class _LeavingRequest:
    """The part of a twisted.web request a :class:`_Gate` uses; ``leave()`` is its client disconnecting."""

    def __init__(self) -> None:
        self.producer: object = None
        self.channel: object = object()
        self._finished: list[defer.Deferred[None]] = []

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def notifyFinish(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._finished.append(d)
        return d

    def leave(self) -> None:
        self.channel = None
        for d in self._finished:
            d.errback(ConnectionDone())


class _CallsLater:
    """A reactor's ``callFromThread``, recorded and not run."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], object]] = []

    def callFromThread(self, f: Callable[[], object]) -> None:
        self.calls.append(f)


class WSGIPausedDisconnectTests(unittest.SynchronousTestCase):
    def test_a_reader_that_leaves_while_paused_asks_the_body_for_nothing_more(self) -> None:
        """A client that leaves while its response is paused ends the iteration without asking the body for more."""
        asked: list[int] = []
        closed: list[bool] = []

        def body() -> Iterator[bytes]:
            try:
                for i in range(3):
                    asked.append(i)
                    yield b"x"
            finally:
                closed.append(True)

        request = _LeavingRequest()
        gate = _Gate(cast(Any, _CallsLater()), request, 60.0)
        paced = _paced_body(body(), gate)
        self.assertEqual(next(paced), b"x")
        gate.pauseProducing()  # the connection's buffer is full
        rest: list[list[bytes]] = []
        thread = threading.Thread(target=lambda: rest.append(list(paced)), daemon=True)
        thread.start()
        thread.join(0.2)
        self.assertTrue(thread.is_alive(), "the body went on while paused")
        request.leave()
        thread.join(5)
        self.assertFalse(thread.is_alive())
        self.assertEqual(rest, [[]])
        self.assertEqual(asked, [0])
        self.assertEqual(closed, [True])

    def test_a_client_that_takes_nothing_for_send_timeout_is_cut_off(self) -> None:
        """A response paused for send_timeout: the connection is aborted and the body closed, freeing the thread."""
        closed: list[bool] = []

        def body() -> Iterator[bytes]:
            try:
                while True:
                    yield b"x"
            finally:
                closed.append(True)

        class Transport:
            aborted = 0

            def abortConnection(self) -> None:
                self.aborted += 1

        request = _LeavingRequest()
        transport = Transport()
        request.channel = type("Channel", (), {"transport": transport})()
        reactor = _CallsLater()
        gate = _Gate(cast(Any, reactor), request, 0.2)
        paced = _paced_body(body(), gate)
        self.assertEqual(next(paced), b"x")
        gate.pauseProducing()  # the client reads nothing
        rest: list[list[bytes]] = []
        thread = threading.Thread(target=lambda: rest.append(list(paced)), daemon=True)
        thread.start()
        thread.join(5)
        self.assertFalse(thread.is_alive(), "the thread still waits on a client that takes nothing")
        self.assertEqual((rest, closed), ([[]], [True]))
        for call in reactor.calls:  # on the reactor's thread
            call()
        self.assertEqual(transport.aborted, 1)

    def test_send_timeout_must_be_a_positive_number(self) -> None:
        """WSGI(send_timeout=...) refuses 0, negatives, NaN, infinity, an int beyond a float and bools."""
        for bad in (0, -1, float("nan"), float("inf"), 10**400, True, "60", None):
            with self.assertRaises(OptionError) as caught:
                WSGI(lambda environ, start_response: [], send_timeout=bad)
            self.assertEqual((caught.exception.owner, caught.exception.option), ("WSGI", "send_timeout"))
            self.assertIn("a positive number of seconds", str(caught.exception))

    def test_threads_must_be_a_positive_integer(self) -> None:
        """WSGI(threads=...) refuses 0, negatives, floats, bools and strings, naming the option."""
        for bad in (0, -1, 2.0, True, "4", None):
            with self.assertRaises(OptionError) as caught:
                WSGI(lambda environ, start_response: [], threads=bad)
            self.assertEqual((caught.exception.owner, caught.exception.option), ("WSGI", "threads"))
            self.assertIn("a positive integer", str(caught.exception))

    def test_a_send_timeout_beyond_what_a_wait_takes_waits_for_the_connection(self) -> None:
        """A send_timeout as large as a float waits (neither raising nor giving up) until the connection takes more."""
        request = _LeavingRequest()
        gate = _Gate(cast(Any, _CallsLater()), request, sys.float_info.max)
        gate.pauseProducing()
        errors: list[BaseException] = []

        def wait() -> None:
            try:
                gate.wait()
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        thread.join(0.2)
        self.assertTrue(thread.is_alive(), f"the wait ended at once: {errors}")
        gate.resumeProducing()
        thread.join(5)
        self.assertFalse(thread.is_alive())
        self.assertEqual((errors, gate.done), ([], False))


def _head_deadlines() -> int:
    """How many request-head deadlines the reactor holds."""
    return sum(getattr(call.func, "__name__", "") == "_head_timed_out" for call in R.getDelayedCalls())


class WSGIHeaderTimeoutTests(unittest.TestCase):
    """A request's head that does not come in full within ``header_timeout`` seconds of its first byte gets 408."""

    def serve(self, **options: Any) -> int:
        target = WSGI(SlowApp().flask, threads=2, **options)
        port, factory = mux(self, [Rule(HTTP1(), target, name="wsgi")])
        factory.doStart()
        self.addCleanup(factory.doStop)
        return port

    async def closed_after(self, client: Any, seconds: float = 3.0) -> float:
        """Seconds until ``client``'s connection ends (fails after ``seconds``)."""
        started = R.seconds()
        await until(lambda: client.eof.called or client.lost.called, seconds)
        return R.seconds() - started

    def assert_timed_out(self, received: bytes) -> None:
        self.assertTrue(received.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), received)
        self.assertIn(b"\r\nConnection: close\r\n", received)

    async def test_a_partial_head_gets_408_then_eof_at_header_timeout(self) -> None:
        """A request line and a header line, then nothing: 408 and EOF about header_timeout later."""
        port = self.serve(header_timeout=0.5)
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
        elapsed = await self.closed_after(client)
        self.assertGreater(elapsed, 0.4)
        self.assertLess(elapsed, 2.5)  # about header_timeout: far from the 10 s grace, room for a busy host
        self.assert_timed_out(bytes(client.received))
        self.assertEqual(_head_deadlines(), 0)

    async def test_a_head_dribbled_a_byte_at_a_time_gets_408_at_header_timeout(self) -> None:
        """A byte of a header every 0.2 s does not extend the deadline: 408 about header_timeout after the first."""
        port = self.serve(header_timeout=0.5)
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(b"GET /hello HTTP/1.1\r\nX-Slow: ")
        started = R.seconds()
        for _ in range(15):
            await deferLater(R, 0.2, lambda: None)
            if client.eof.called or client.lost.called:
                break
            client.transport.write(b"x")
        self.assertTrue(client.eof.called or client.lost.called, "still open after 3 s of dribbling")
        self.assertLess(R.seconds() - started, 2.5)
        self.assert_timed_out(bytes(client.received))

    async def test_a_head_sent_in_pieces_within_the_deadline_is_answered(self) -> None:
        """A head in three pieces within header_timeout is answered, and its deadline is cancelled."""
        port = self.serve(header_timeout=0.5)
        client = await connect(self, port)
        assert client.transport is not None
        for piece in (b"GET /hello HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
            client.transport.write(piece)
            await deferLater(R, 0.1, lambda: None)
        await until(lambda: bytes(client.received).endswith(b"hello from flask"), 5)
        self.assertTrue(bytes(client.received).startswith(b"HTTP/1.1 200 OK\r\n"), bytes(client.received))
        self.assertEqual(_head_deadlines(), 0)
        await deferLater(R, 0.6, lambda: None)
        self.assertFalse(client.eof.called or client.lost.called)

    async def test_a_second_request_on_a_keep_alive_connection_has_its_own_deadline(self) -> None:
        """After a first request answered, a second whose head stops coming gets 408 about header_timeout later."""
        port = self.serve(header_timeout=0.5)
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        await until(lambda: bytes(client.received).endswith(b"hello from flask"), 5)
        await deferLater(R, 0.6, lambda: None)  # idle between requests: no deadline then
        self.assertFalse(client.eof.called or client.lost.called)
        first = len(client.received)
        client.transport.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
        elapsed = await self.closed_after(client)
        self.assertGreater(elapsed, 0.4)
        self.assertLess(elapsed, 2.5)  # about header_timeout: far from the 10 s grace, room for a busy host
        self.assert_timed_out(bytes(client.received)[first:])

    async def test_no_header_timeout_leaves_a_partial_head_waiting(self) -> None:
        """header_timeout=None: a partial head is neither answered nor closed, and no deadline is set."""
        port = self.serve(header_timeout=None)
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
        await deferLater(R, 1.0, lambda: None)
        self.assertFalse(client.eof.called or client.lost.called)
        self.assertEqual(bytes(client.received), b"")
        self.assertEqual(_head_deadlines(), 0)

    def test_header_timeout_must_be_a_positive_number_or_none(self) -> None:
        """WSGI(header_timeout=...) refuses 0, negatives, NaN, infinity, an int beyond a float, bools and strings."""
        for bad in (0, -1, float("nan"), float("inf"), 10**400, True, "30"):
            with self.assertRaises(OptionError) as caught:
                WSGI(lambda environ, start_response: [], header_timeout=bad)
            self.assertEqual((caught.exception.owner, caught.exception.option), ("WSGI", "header_timeout"))
            self.assertIn("a positive number of seconds or None", str(caught.exception))
        self.assertEqual(WSGI(lambda environ, start_response: []).header_timeout, 30.0)
        self.assertIsNone(WSGI(lambda environ, start_response: [], header_timeout=None).header_timeout)
