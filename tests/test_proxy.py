"""
The relay of muxtwist.proxy on real loopback sockets: order of bytes,
half-close, aborts, failures, failover, backpressure and leaks.
"""

from __future__ import annotations

import os
import random
import socket
import sys
import time
from typing import Any

from twisted.internet import defer, error, task
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from muxtwist import ConnectionInfo, Rule
from muxtwist.actions import Proxy
from muxtwist.matchers import Any as AnyMatcher
from muxtwist.matchers import Prefix
from muxtwist.proxy import _splice
from muxtwist.proxy._polled import PolledServer
from muxtwist.proxy._relay import PENDING_LIMIT
from tests.test_proxy_support import (
    Echo,
    Peer,
    R,
    backend,
    connect,
    free_port,
    mux,
    open_fds,
    until,
    wait,
)


def capture_logs(case: unittest.TestCase) -> list[dict[str, Any]]:
    """Every log event emitted during the test."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    case.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def logged(events: list[dict[str, Any]], word: str) -> list[dict[str, Any]]:
    return [e for e in events if word in e.get("log_format", "") and e.get("log_namespace") == "muxtwist.proxy"]


def proxied(case: unittest.TestCase, proxy: Proxy, **options: Any) -> int:
    port, _ = mux(case, [Rule(AnyMatcher(), proxy, name="relay")], **options)
    return port


def _full_listener(case: unittest.TestCase) -> socket.socket:
    """A listening socket whose accept queue is full: further SYNs are dropped, so connects hang."""
    full = socket.socket()
    case.addCleanup(full.close)
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(full.getsockname())
        case.addCleanup(s.close)
    return full


class SpliceOption:
    """Tests of the relay run on the splice(2) path (where the platform has it) and, in a subclass, without it."""

    splice = True
    #: whether the listener reads its clients in the splice poller from their accept on, as a Listener's does.
    polled = False

    def relay_proxy(self, backends: Any, **options: Any) -> Proxy:
        return Proxy(backends, splice=self.splice, **options)


class RelayTests(SpliceOption, unittest.TestCase):
    async def test_sniffed_bytes_first_then_both_ways(self) -> None:
        """The sniffed bytes reach the backend first, then data flows both ways in order."""
        desc, backends = backend(self)
        proxy = self.relay_proxy(desc)
        port = proxied(self, proxy)
        client = await connect(self, port)
        client.transport.write(b"hello ")  # type: ignore[union-attr]
        server = await wait(backends.arrived)
        await server.received_at_least(6)
        client.transport.write(b"world")  # type: ignore[union-attr]
        self.assertEqual(await client.received_at_least(11), b"hello world")
        self.assertEqual(bytes(server.received), b"hello world")
        (relay,) = proxy.relays
        self.assertEqual(relay.spliced, self.splice and sys.platform.startswith("linux"))
        self.assertEqual(isinstance(relay.transport, PolledServer), self.polled and sys.platform.startswith("linux"))
        server.transport.write(b"!")  # type: ignore[union-attr]
        await client.received_at_least(12)
        self.assertEqual((relay.bytes_in, relay.bytes_out), (11, 12))

    async def test_end_event_carries_relayed_bytes(self) -> None:
        """The connection's end event says how many bytes the relay moved each way."""
        events = capture_logs(self)
        desc, backends = backend(self)
        proxy = self.relay_proxy(desc)
        port = proxied(self, proxy)
        client = await connect(self, port)
        client.transport.write(b"ping")  # type: ignore[union-attr]
        server = await wait(backends.arrived)
        await client.received_at_least(4)
        server.transport.write(b"+pong")  # type: ignore[union-attr]
        await client.received_at_least(9)
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.closed()
        await until(lambda: any(e.get("log_event") == "connection_end" for e in events))
        (end,) = [e for e in events if e.get("log_event") == "connection_end"]
        self.assertEqual((end["relayed_in"], end["relayed_out"]), (4, 9))

    def test_client_read_while_backend_connects_until_the_pending_limit(self) -> None:
        """While no backend has answered, the client is read until PENDING_LIMIT bytes wait, then paused."""
        proxy = self.relay_proxy(f"tcp:host=127.0.0.1:port={free_port()}", connect_timeout=5)
        relay = proxy.buildProtocolForConnection(None, ConnectionInfo(), "r")  # type: ignore[arg-type]
        assert relay is not None
        transport = StringTransport()
        relay.makeConnection(transport)
        self.assertEqual(transport.producerState, "producing")
        relay.dataReceived(b"x" * (PENDING_LIMIT - 1))
        self.assertEqual(transport.producerState, "producing")
        relay.dataReceived(b"y")
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(relay.buffered(), PENDING_LIMIT)  # type: ignore[attr-defined]
        relay.connectionLost(error.ConnectionDone())  # type: ignore[arg-type]
        self.assertEqual(proxy.relays, set())

    async def test_client_half_close_reaches_backend(self) -> None:
        """A client's half-close reaches the backend, whose answer and own half-close still reach the client."""
        desc, backends = backend(self, Echo)
        proxy = self.relay_proxy(desc)
        port = proxied(self, proxy)
        client = await connect(self, port)
        client.transport.write(b"ping")  # type: ignore[union-attr]
        server = await wait(backends.arrived)
        await server.received_at_least(4)
        client.transport.write(b" more")  # type: ignore[union-attr]
        client.transport.loseWriteConnection()  # type: ignore[union-attr]
        await wait(server.eof)
        await wait(client.eof)
        self.assertEqual(bytes(client.received), b"ping more")
        await client.closed()
        await wait(server.lost)
        self.assertTrue(client.reason.check(error.ConnectionDone))  # type: ignore[union-attr]
        await until(lambda: not proxy.relays)

    async def test_backend_half_close_reaches_client(self) -> None:
        """A backend's half-close reaches the client, who can still send to the backend afterwards."""

        class Greeter(Peer):
            def connectionMade(self) -> None:
                super().connectionMade()
                self.transport.write(b"banner")  # type: ignore[union-attr]
                self.transport.loseWriteConnection()  # type: ignore[union-attr]

        desc, backends = backend(self, Greeter)
        proxy = self.relay_proxy(desc)
        port = proxied(self, proxy)
        client = await connect(self, port)
        client.transport.write(b"a")  # type: ignore[union-attr]
        await wait(client.eof)
        self.assertEqual(bytes(client.received), b"banner")
        self.assertFalse(client.lost.called)
        client.transport.write(b"fter")  # type: ignore[union-attr]
        server = backends.built[0]
        self.assertEqual(await server.received_at_least(5), b"after")
        client.transport.loseWriteConnection()  # type: ignore[union-attr]
        await wait(server.lost)
        await client.closed()
        await until(lambda: not proxy.relays)

    async def test_half_close_while_sniffing_and_connecting(self) -> None:
        """Bytes and a half-close sent before the rules decide reach the backend in order, and the answer comes back."""
        desc, backends = backend(self, Echo)
        proxy = self.relay_proxy(desc)
        port, _ = mux(
            self, [Rule(Prefix(b"a-longer-prefix"), self.relay_proxy("tcp:host=127.0.0.1:port=1"))], on_no_match=proxy
        )
        client = await connect(self, port)
        client.transport.write(b"a-long")  # type: ignore[union-attr]
        client.transport.loseWriteConnection()  # type: ignore[union-attr]
        server = await wait(backends.arrived)
        await wait(server.eof)
        self.assertEqual(bytes(server.received), b"a-long")
        await wait(client.eof)
        self.assertEqual(bytes(client.received), b"a-long")
        await wait(client.lost)
        await until(lambda: not proxy.relays)

    async def test_unix_backend(self) -> None:
        """A backend on a UNIX socket works like a TCP one."""
        from tests.test_proxy_support import PeerFactory, tempdir

        path = tempdir(self) + "/backend.sock"
        factory = PeerFactory(Echo)
        listening = R.listenUNIX(path, factory)
        self.addCleanup(listening.stopListening)
        port = proxied(self, self.relay_proxy(f"unix:path={path}"))
        client = await connect(self, port)
        client.transport.write(b"over unix")  # type: ignore[union-attr]
        self.assertEqual(await client.received_at_least(9), b"over unix")
        client.transport.loseConnection()  # type: ignore[union-attr]
        await wait(factory.built[0].lost)

    async def test_client_abort_aborts_backend(self) -> None:
        """A client that resets its connection gets the backend connection aborted too."""
        desc, backends = backend(self)
        proxy = self.relay_proxy(desc)
        port = proxied(self, proxy)
        client = await connect(self, port)
        client.transport.write(b"x")  # type: ignore[union-attr]
        server = await wait(backends.arrived)
        await server.received_at_least(1)
        client.transport.abortConnection()  # type: ignore[union-attr]
        await wait(server.lost)
        reason = server.reason
        assert reason is not None
        self.assertFalse(reason.check(error.ConnectionDone), reason)
        await until(lambda: not proxy.relays)

    async def test_backend_reset_mid_stream(self) -> None:
        """A backend reset mid-stream is logged once with rule and backend, counted, and aborts the client."""
        events = capture_logs(self)
        desc, backends = backend(self)
        proxy = self.relay_proxy(desc)
        port = proxied(self, proxy)
        client = await connect(self, port)
        client.transport.write(b"x")  # type: ignore[union-attr]
        server = await wait(backends.arrived)
        await server.received_at_least(1)
        server.transport.abortConnection()  # type: ignore[union-attr]  # SO_LINGER 0: an RST
        reason = await client.closed()
        assert reason is not None
        self.assertFalse(reason.check(error.ConnectionDone), reason)
        await until(lambda: not proxy.relays)
        resets = logged(events, "mid-stream")
        self.assertEqual(len(resets), 1)
        self.assertEqual((resets[0]["rule"], resets[0]["backend"]), ("relay", desc))
        self.assertEqual(proxy.stats[desc].errors, {"reset": 1})
        self.assertEqual(proxy.stats[desc].active, 0)

    async def test_backend_clean_close_flushes_to_client(self) -> None:
        """A backend that writes and closes gets every byte to the client before the client sees the end."""
        big = bytes(range(256)) * 4096

        class Sender(Peer):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(big)  # type: ignore[union-attr]
                self.transport.loseConnection()  # type: ignore[union-attr]

        desc, _ = backend(self, Sender)
        port = proxied(self, self.relay_proxy(desc))
        client = await connect(self, port)
        client.transport.write(b"go")  # type: ignore[union-attr]
        # A FIN cannot tell a close from a half-close: the client gets a half-close.
        await wait(client.eof)
        self.assertEqual(bytes(client.received), big)
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.closed()


class FailureTests(SpliceOption, unittest.TestCase):
    async def test_refused(self) -> None:
        """A refused connect is logged once with rule and backend, counted, and closes the client cleanly."""
        events = capture_logs(self)
        desc = f"tcp:host=127.0.0.1:port={free_port()}"
        proxy = self.relay_proxy(desc)
        port = proxied(self, proxy)
        client = await connect(self, port)
        client.transport.write(b"hi")  # type: ignore[union-attr]
        reason = await client.closed()
        assert reason is not None
        self.assertTrue(reason.check(error.ConnectionDone), reason)
        failures = logged(events, "failed for")
        self.assertEqual(len(failures), 1)
        self.assertEqual((failures[0]["rule"], failures[0]["backend"], failures[0]["kind"]), ("relay", desc, "refused"))
        self.assertEqual(proxy.stats[desc].errors, {"refused": 1})
        self.assertEqual(proxy.gave_up, 1)
        self.assertEqual(proxy.relays, set())

    async def test_failover_to_next_backend(self) -> None:
        """With several backends, a failed connect tries the next one, and the client never notices."""
        dead = f"tcp:host=127.0.0.1:port={free_port()}"
        desc, backends = backend(self)
        proxy = self.relay_proxy([dead, desc], balance="first")
        port = proxied(self, proxy)
        client = await connect(self, port)
        client.transport.write(b"hello")  # type: ignore[union-attr]
        self.assertEqual(await client.received_at_least(5), b"hello")
        self.assertEqual(proxy.stats[dead].errors, {"refused": 1})
        self.assertEqual((proxy.stats[desc].total, proxy.stats[desc].active), (1, 1))

    async def test_connect_timeout(self) -> None:
        """A backend whose accept queue is full times out after connect_timeout, logged once and counted."""
        events = capture_logs(self)
        full = _full_listener(self)
        desc = f"tcp:host=127.0.0.1:port={full.getsockname()[1]}"
        proxy = self.relay_proxy(desc, connect_timeout=0.3)
        port = proxied(self, proxy)
        client = await connect(self, port)
        client.transport.write(b"hi")  # type: ignore[union-attr]
        started = time.monotonic()
        reason = await client.closed()
        assert reason is not None
        self.assertTrue(reason.check(error.ConnectionDone), reason)
        self.assertGreaterEqual(time.monotonic() - started, 0.25)
        failures = logged(events, "failed for")
        self.assertEqual([f["kind"] for f in failures], ["timeout"])
        self.assertEqual(proxy.stats[desc].errors, {"timeout": 1})

    async def test_a_connect_done_while_the_process_was_busy_is_not_timed_out(self) -> None:
        """A connect the kernel finished before connect_timeout is relayed when the process only looks after it."""
        events = capture_logs(self)
        desc, backends = backend(self)
        proxy = self.relay_proxy(desc, connect_timeout=0.2)
        connect_backend = proxy._connect

        def busy_connect(*args: Any) -> Any:
            attempt = connect_backend(*args)
            # The process is busy past connect_timeout (a burst, a long pause)
            # while the kernel finishes the connect: the deadline is due before
            # the socket is seen writable.
            time.sleep(0.4)
            return attempt

        proxy._connect = busy_connect  # type: ignore[method-assign]
        port = proxied(self, proxy)
        client = await connect(self, port)
        client.transport.write(b"ping")  # type: ignore[union-attr]
        server = await wait(backends.arrived)
        await server.received_at_least(4)
        # Echoed back through the relay.
        self.assertEqual(await client.received_at_least(4), b"ping")
        self.assertEqual(logged(events, "failed for"), [])
        self.assertEqual(proxy.stats[desc].errors, {})

    async def test_client_leaves_while_connecting(self) -> None:
        """A client gone while the backend connect is pending cancels the attempt and its timer, logging no failure."""
        events = capture_logs(self)
        full = _full_listener(self)
        proxy = self.relay_proxy(f"tcp:host=127.0.0.1:port={full.getsockname()[1]}", connect_timeout=30)
        relay = proxy.buildProtocolForConnection(None, ConnectionInfo(), "r")  # type: ignore[arg-type]
        assert relay is not None
        relay.makeConnection(StringTransport())
        self.assertEqual(len(proxy.relays), 1)
        deadlines = proxy._connect_deadlines
        assert deadlines is not None
        self.assertEqual(deadlines.live, 1)
        self.assertTrue([c for c in R.getDelayedCalls() if getattr(c.func, "__self__", None) is deadlines])
        relay.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(proxy.relays, set())
        self.assertEqual(deadlines.live, 0)
        self.assertEqual([c for c in R.getDelayedCalls() if getattr(c.func, "__self__", None) is deadlines], [])
        self.assertEqual(logged(events, "failed for"), [])
        self.assertEqual(proxy.stats[proxy.backends[0].description].failures, 0)

    async def test_a_client_reset_while_connecting_cancels_the_attempt_at_once(self) -> None:
        """A real client that resets while its backend connect hangs ends its relay at once, not at connect_timeout."""
        full = _full_listener(self)
        proxy = self.relay_proxy(f"tcp:host=127.0.0.1:port={full.getsockname()[1]}", connect_timeout=30)
        port = proxied(self, proxy)
        client = await connect(self, port)
        client.transport.write(b"hi")  # type: ignore[union-attr]
        await until(lambda: len(proxy.relays) == 1)
        started = time.monotonic()
        client.transport.abortConnection()  # type: ignore[union-attr]
        await until(lambda: not proxy.relays, seconds=5)
        self.assertLess(time.monotonic() - started, 5)

    async def test_max_connections(self) -> None:
        """Connections beyond max_connections are closed at once and counted."""
        desc, _ = backend(self)
        proxy = self.relay_proxy(desc, max_connections=1)
        port = proxied(self, proxy)
        first = await connect(self, port)
        first.transport.write(b"1")  # type: ignore[union-attr]
        await first.received_at_least(1)
        second = await connect(self, port)
        second.transport.write(b"2")  # type: ignore[union-attr]
        await second.closed()
        self.assertEqual(bytes(second.received), b"")
        self.assertEqual(proxy.gave_up, 1)

    async def test_idle_timeout(self) -> None:
        """A relay with no byte moving for idle_timeout is closed on both ends."""
        desc, backends = backend(self)
        proxy = self.relay_proxy(desc, idle_timeout=0.2)
        port = proxied(self, proxy)
        client = await connect(self, port)
        client.transport.write(b"1")  # type: ignore[union-attr]
        await client.received_at_least(1)
        started = time.monotonic()
        await client.closed()
        await wait(backends.built[0].lost)
        self.assertGreaterEqual(time.monotonic() - started, 0.15)
        await until(lambda: not proxy.relays)


class LeakTests(SpliceOption, unittest.TestCase):
    async def test_no_leaks_after_every_ending(self) -> None:
        """After normal ends, half-closes, aborts, resets, refusals and timeouts, no fd or delayed call is left."""
        desc, backends = backend(self)
        dead = f"tcp:host=127.0.0.1:port={free_port()}"
        good = self.relay_proxy(desc)
        bad = self.relay_proxy(dead)
        port, _ = mux(self, [Rule(Prefix(b"bad"), bad), Rule(AnyMatcher(), good, name="good")])
        # Warm up so lazily opened descriptors (the reactor's waker...) exist before counting.
        warm = await connect(self, port)
        warm.transport.write(b"w")  # type: ignore[union-attr]
        await warm.received_at_least(1)
        warm.transport.loseConnection()  # type: ignore[union-attr]
        await warm.closed()
        await until(lambda: not good.relays)
        fds = open_fds()
        calls = len(R.getDelayedCalls())
        for ending in ("close", "half", "abort", "reset", "refused"):
            client = await connect(self, port)
            client.transport.write(b"bad" if ending == "refused" else b"data")  # type: ignore[union-attr]
            if ending == "refused":
                await client.closed()
                continue
            await client.received_at_least(4)
            server = backends.built[-1]
            if ending == "close":
                client.transport.loseConnection()  # type: ignore[union-attr]
            elif ending == "half":
                client.transport.loseWriteConnection()  # type: ignore[union-attr]
            elif ending == "abort":
                client.transport.abortConnection()  # type: ignore[union-attr]
            else:
                server.transport.abortConnection()  # type: ignore[union-attr]
            await client.closed()
            await wait(server.lost)
        await until(lambda: not good.relays and not bad.relays)
        await until(lambda: open_fds() <= fds, 5)
        self.assertEqual(len(R.getDelayedCalls()), calls)
        self.assertEqual(good.stats[desc].active, 0)


class BackpressureTests(SpliceOption, unittest.TestCase):
    SIZE = 200 * 1024 * 1024
    BOUND = 1024 * 1024

    async def test_slow_reader_keeps_memory_bounded(self) -> None:
        """200 MB to a backend that reads slowly: the relay's buffered bytes stay under 1 MiB throughout."""
        size, bound = self.SIZE, self.BOUND
        worst = [0]

        zero_copy = [False]

        def measure() -> None:
            for relay in proxy.relays:
                worst[0] = max(worst[0], relay.buffered())
                zero_copy[0] = zero_copy[0] or (relay._splice is not None and relay._splice.zero_copy)

        class SlowReader(Peer):
            """Stops reading for a moment after every 8 MB."""

            count = 0
            mark = 0

            def dataReceived(self, data: bytes) -> None:
                self.count += len(data)
                measure()
                if self.count - self.mark >= 8 * 1024 * 1024:
                    self.mark = self.count
                    self.transport.pauseProducing()  # type: ignore[union-attr]
                    R.callLater(0.05, self.transport.resumeProducing)  # type: ignore[union-attr]

        desc, backends = backend(self, SlowReader)
        proxy = self.relay_proxy(desc)
        port = proxied(self, proxy)
        client = await connect(self, port)
        chunk = b"x" * 65536
        sent = [0]
        done: defer.Deferred[None] = defer.Deferred()

        class Pump:
            paused = False

            def pauseProducing(self) -> None:
                self.paused = True

            def resumeProducing(self) -> None:
                self.paused = False
                R.callLater(0, self.fill)

            def stopProducing(self) -> None:
                self.paused = True

            def fill(self) -> None:
                while not self.paused and sent[0] < size:
                    client.transport.write(chunk)  # type: ignore[union-attr]
                    sent[0] += len(chunk)
                    measure()
                if sent[0] >= size and not done.called:
                    client.transport.unregisterProducer()  # type: ignore[union-attr]
                    done.callback(None)

        pump = Pump()
        client.transport.registerProducer(pump, True)  # type: ignore[union-attr]
        started = time.monotonic()
        pump.fill()
        await wait(done, 60)
        server = await wait(backends.arrived)
        await until(lambda: server.count >= size, 60)
        elapsed = time.monotonic() - started
        self.assertEqual(server.count, size)
        self.assertLess(worst[0], bound, f"relay buffered up to {worst[0]} bytes")
        self.assertGreater(worst[0], 0)
        self.assertLess(elapsed, 60)
        self.assertEqual(zero_copy[0], self.splice and sys.platform.startswith("linux"))


class RelayTestsWithoutSplice(RelayTests):
    splice = False


class FailureTestsWithoutSplice(FailureTests):
    splice = False


class LeakTestsWithoutSplice(LeakTests):
    splice = False


class BackpressureTestsWithoutSplice(BackpressureTests):
    splice = False


class RelayTestsPolled(RelayTests):
    polled = True


class FailureTestsPolled(FailureTests):
    polled = True


class LeakTestsPolled(LeakTests):
    polled = True


class BackpressureTestsPolled(BackpressureTests):
    polled = True


class RelayTestsPolledWithoutSplice(RelayTests):
    polled = True
    splice = False


class FailureTestsPolledWithoutSplice(FailureTests):
    polled = True
    splice = False


class BackpressureTestsPolledWithoutSplice(BackpressureTests):
    polled = True
    splice = False


def _open_pipes() -> int:
    """How many pipe descriptors this process has open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:"):
                count += 1
        except OSError:
            pass
    return count


class PipeCapTests(unittest.TestCase):
    """The process-wide cap on splice pipes (``Proxy.set_max_pipes``)."""

    def setUp(self) -> None:
        if not _splice.AVAILABLE:
            raise unittest.SkipTest("splice(2) is Linux only")
        limit = Proxy.pipe_usage()["limit"]
        self.addCleanup(Proxy.set_max_pipes, limit)

    async def test_cap_holds_and_bytes_stay_intact_past_it(self) -> None:
        """With a cap of one pipe, four bulk relays both ways open one pipe at most and every byte arrives intact."""
        Proxy.set_max_pipes(1)
        refused_before = Proxy.pipe_usage()["refused"]
        desc, _ = backend(self, Echo)
        proxy = Proxy(desc, splice=True)
        port = proxied(self, proxy)
        # Warm up so lazily opened descriptors (the reactor's waker...) exist before counting.
        warm = await connect(self, port)
        warm.transport.write(b"w")  # type: ignore[union-attr]
        await warm.received_at_least(1)
        warm.transport.loseConnection()  # type: ignore[union-attr]
        await warm.closed()
        await until(lambda: not proxy.relays)
        baseline = _open_pipes()
        worst = [0]

        def sample() -> None:
            n = _open_pipes() - baseline
            worst[0] = max(worst[0], n)

        sampler = task.LoopingCall(sample)
        sampler.start(0.002)
        self.addCleanup(lambda: sampler.stop() if sampler.running else None)
        payloads = [random.Random(i).randbytes(3 * 1024 * 1024) for i in range(4)]
        clients = [await connect(self, port) for _ in payloads]
        for client, payload in zip(clients, payloads, strict=True):
            client.transport.write(payload)  # type: ignore[union-attr]
        for client, payload in zip(clients, payloads, strict=True):
            await client.received_at_least(len(payload), 30)
        piped = [f for r in proxy.relays for f in (r._splice.up, r._splice.down) if r._splice and f.piped]
        self.assertEqual(len(proxy.relays), 4)
        self.assertTrue(all(r.spliced for r in proxy.relays))
        for client in clients:
            client.transport.loseConnection()  # type: ignore[union-attr]
            await client.closed()
        sampler.stop()
        self.assertEqual([bytes(c.received) == p for c, p in zip(clients, payloads, strict=True)], [True] * 4)
        self.assertEqual(len(piped), 1)
        self.assertEqual(worst[0], 2)
        self.assertIn(Proxy.pipe_usage()["refused"] - refused_before, range(1, 8))
        await until(lambda: not proxy.relays)
        self.assertEqual(Proxy.pipe_usage()["open"], 0)
        self.assertEqual(_open_pipes(), baseline)

    def test_zero_and_bad_limits(self) -> None:
        """A cap of 0 is allowed (never splice-pipe); a negative or non-integer cap is refused with a clear error."""
        Proxy.set_max_pipes(0)
        self.assertEqual(Proxy.pipe_usage()["limit"], 0)
        for bad in (-1, 1.5, "8", True):
            with self.assertRaises(ValueError) as caught:
                Proxy.set_max_pipes(bad)  # type: ignore[arg-type]
            self.assertIn("max pipes", str(caught.exception))

    def test_default_is_a_quarter_of_the_descriptor_limit(self) -> None:
        """By default pipes may hold a quarter of the process's descriptors: RLIMIT_NOFILE // 8 pipes."""
        import resource

        self.assertEqual(_splice.default_max_pipes(), resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 8)
