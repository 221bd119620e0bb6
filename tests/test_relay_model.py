"""
A stateful model test of the relay of :class:`muxtwist.actions.Proxy`, on
both relay paths (the Twisted relay and the splice relay), with real
loopback sockets.

Hypothesis drives a client and a backend as plain non-blocking sockets with
small receive buffers, around a real mux listener and a real ``Proxy`` run
by the reactor. Each example draws its listener (the client read by
Twisted's transport, or by the splice poller as on a listener whose rules
only relay) and whether the backend's connect is held back; if it is, the
client sends, half-closes or resets while its relay waits for the backend
(the relay keeps what arrives up to its limit, and stops reading the client
beyond it) until a step lets the connect go. Then: sends of any size, reads
of any size or none for a while (a slow reader: the kernel buffers fill,
and the relay must pause reading the other side, through its transports'
``pauseProducing``/``resumeProducing`` on the Twisted relay and by dropping
the reader on the splice relay), half-closes in either order, resets from
either end (a backend that dies), and reactor turns in between. Each
example also draws the splice relay's chunk size, so small examples reach
its pipe path too. After every step:

- what each end has received is a prefix of what the other end's kernel
  accepted (nothing lost, duplicated, reordered or invented);
- the relay holds a bounded number of bytes (backpressure works), and
  while it waits for its backend, at most its limit and one read more.

At the end of every example, unless something was reset, both ends read
everything and half-close one after the other: every byte accepted reached
the other end, exactly; the first half-close reached the other end while
it could still send; and the relay closed both of its sockets by itself
once both directions had ended. After a reset of one end, where the relay
hears of it whether or not it reads that end (every end of a spliced relay,
and a client read by the splice poller), the relay ends by itself, though
the other end neither sends nor closes, even when the reset end had
half-closed or was paused (its connect held back, or its backend taking
nothing). In every case, once our own sockets are closed, no descriptor and
no delayed call is left over.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from twisted.internet import defer, reactor
from twisted.trial import unittest

from muxtwist import Rule, SniffingFactory
from muxtwist.actions import Proxy
from muxtwist.matchers import Any as AnyMatcher
from muxtwist.proxy import _splice
from muxtwist.proxy._polled import PolledServer, server_transport
from muxtwist.proxy._relay import PENDING_LIMIT

R: Any = reactor

#: kernel buffer sizes asked for on the test's own sockets: small, so that a
#: few hundred KiB unread fill them and backpressure reaches the relay.
BUFFER = 16 * 1024
#: the most the relay may hold at once (Twisted's write buffers and a
#: splice pipe per direction stay far below it).
BOUND = 2 * 1024 * 1024
#: sizes of one send: small exchanges, exactly one relay chunk, and bulk.
SIZES = st.one_of(st.integers(1, 2048), st.sampled_from([65535, 65536, 65537, 262144]), st.integers(1, 600_000))
#: seconds the end of an example may take to settle.
SETTLE = 3.0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def turn(seconds: float = 0.0) -> None:
    """One reactor iteration (the reactor is not running during a synchronous test)."""
    R.iterate(seconds)


def settle(condition: Any, seconds: float = SETTLE) -> bool:
    """Turn the reactor until ``condition()`` holds; whether it did within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        turn(0.001)
    return True


def small_buffers(sock: socket.socket) -> None:
    """A small receive buffer: an end that does not read soon stops the relay (sends keep the default)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)


class End:
    """One end the model drives (the client or the backend): a socket and what went through it."""

    def __init__(self, name: str, sock: socket.socket) -> None:
        self.name = name
        self.sock = sock
        sock.setblocking(False)
        #: bytes the kernel accepted from this end.
        self.sent = bytearray()
        #: bytes this end read.
        self.received = bytearray()
        self.write_closed = False
        self.eof = False
        self.reset_seen = False
        self.closed = False

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
            except BlockingIOError:
                return
            except OSError:
                self.reset_seen = True
                return
            self.sent += view[:n]
            view = view[n:]

    def read(self, limit: int) -> None:
        while limit > 0 and not self.eof:
            try:
                chunk = self.sock.recv(min(limit, 65536))
            except BlockingIOError:
                return
            except OSError:
                self.reset_seen = True
                return
            if not chunk:
                self.eof = True
                return
            self.received += chunk
            limit -= len(chunk)

    def read_to_end(self) -> bool:
        """Read what there is; whether the other end has finished (end of stream or reset)."""
        self.read(1 << 30)
        return self.eof or self.reset_seen

    def half_close(self) -> None:
        self.write_closed = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.reset_seen = True

    def reset(self) -> None:
        """Close with SO_LINGER 0: an RST, as a process that dies or aborts."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


class Gate:
    """
    A backend endpoint whose connects wait until the gate opens: the relay
    holds its client's bytes meanwhile. Cancelling a waiting connect (the
    client went away) forgets it; once let through, the real connect runs.
    """

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint
        self.closed = False
        self.waiting: list[tuple[Any, defer.Deferred[Any]]] = []

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        if not self.closed:
            connecting: defer.Deferred[Any] = self.endpoint.connect(factory)
            return connecting
        inner: list[defer.Deferred[Any]] = []

        def cancel(d: defer.Deferred[Any]) -> None:
            if inner:
                inner[0].cancel()
            else:
                self.waiting.remove((factory, d))

        d: defer.Deferred[Any] = defer.Deferred(cancel)
        self.waiting.append((factory, d))
        d.inner = inner  # type: ignore[attr-defined]
        return d

    def open(self) -> None:
        self.closed = False
        waiting, self.waiting = self.waiting, []
        for factory, d in waiting:
            connecting = self.endpoint.connect(factory)
            d.inner.append(connecting)  # type: ignore[attr-defined]
            connecting.chainDeferred(d)


class Listeners:
    """
    The mux listeners (one per relay variant: idle timer or not, the client
    read by Twisted's transport or by the splice poller) and the backend's
    listening socket, shared by every example.
    """

    def __init__(self, case: unittest.SynchronousTestCase, splice: bool) -> None:
        self.backend = socket.socket()
        small_buffers(self.backend)
        self.backend.bind(("127.0.0.1", 0))
        self.backend.listen(16)
        self.backend.setblocking(False)
        case.addCleanup(self.backend.close)
        description = f"tcp:host=127.0.0.1:port={self.backend.getsockname()[1]}"
        self.proxies = {}
        self.gates = {}
        self.ports = {}
        for idle in (False, True):
            for polled in (False, True) if splice else (False,):
                proxy = Proxy(description, splice=splice, idle_timeout=600.0 if idle else None)
                gate = Gate(proxy.backends[0].endpoint)
                proxy.backends[0].endpoint = gate  # type: ignore[assignment]
                factory = SniffingFactory([Rule(AnyMatcher(), proxy, name="relay")])
                port = R.listenTCP(0, factory, interface="127.0.0.1")
                if polled:
                    # As muxtwist's listeners do for rules that only relay.
                    port.transport = server_transport
                case.addCleanup(self._stop, port, factory)
                self.proxies[idle, polled] = proxy
                self.gates[idle, polled] = gate
                self.ports[idle, polled] = port.getHost().port

    @staticmethod
    def _stop(port: Any, factory: SniffingFactory) -> None:
        port.stopListening()
        factory.abort_all()
        settle(lambda: not port.connected, 5)


class RelayModel(RuleBasedStateMachine):
    """A client, a relay and a backend; see the module docstring for the rules and invariants."""

    listeners: Listeners
    splice: bool

    def __init__(self) -> None:
        super().__init__()
        self.client: End | None = None
        self.backend: End | None = None
        self.proxy: Proxy | None = None
        self.gate: Gate
        self.fds = 0
        self.calls = 0
        self.pipes = 0
        self.chunk = _splice._CHUNK
        self.closer = "client"
        #: whether the client is read by the splice poller (a listener whose rules only relay).
        self.polled = False
        #: the end the example reset, if any.
        self.reset_by: str | None = None

    @initialize(
        idle=st.booleans(),
        polled=st.booleans(),
        gated=st.booleans(),
        first=st.binary(min_size=1, max_size=4096),
        chunk=st.sampled_from([4096, 65536]),
        closer=st.sampled_from(["client", "backend"]),
    )
    def connect(self, idle: bool, polled: bool, gated: bool, first: bytes, chunk: int, closer: str) -> None:
        """
        A client connects through the mux and sends its first bytes; the
        relay connects to the backend, at once or (``gated``) once a step
        lets it.
        """
        # The splice relay moves a direction to a pipe after one full read of
        # its chunk; a small chunk brings small examples to the pipe path.
        self.chunk = _splice._CHUNK
        _splice._CHUNK = chunk
        #: which end half-closes first at the end of the example (unless one already has).
        self.closer = closer
        self.fds = open_fds()
        self.calls = len(R.getDelayedCalls())
        self.pipes = _splice.pipes.open
        key = (idle, polled and self.splice)
        self.polled = key[1]
        self.reset_by = None
        self.proxy = self.listeners.proxies[key]
        self.gate = self.listeners.gates[key]
        self.gate.closed = gated
        event("backend connect: " + ("held back" if gated else "at once"))
        sock = socket.socket()
        small_buffers(sock)
        sock.connect(("127.0.0.1", self.listeners.ports[key]))
        self.client = End("client", sock)
        self.client.send(first)
        if gated:
            assert settle(lambda: len(self.relays()) == 1), "the client's relay never started"
        else:
            self.backend_connects()

    def backend_accepted(self) -> bool:
        """Whether the backend has accepted the relay's connection (accepting it if it is there)."""
        if self.backend is not None:
            return True
        try:
            sock = self.listeners.backend.accept()[0]
        except BlockingIOError:
            return False
        self.backend = End("backend", sock)
        return True

    def drain_backend(self) -> None:
        """Accept and check what a relay that ended without us connected to the backend."""
        assert self.client is not None
        while True:
            try:
                stray = End("backend", self.listeners.backend.accept()[0])
            except BlockingIOError:
                return
            try:
                assert settle(stray.read_to_end)
                assert stray.received == self.client.sent[: len(stray.received)], "client -> backend bytes differ"
            finally:
                stray.close()

    def drained(self) -> bool:
        """Whether the relay has ended, once what it connected to the backend is checked and closed."""
        self.drain_backend()
        ended = not self.relays()
        self.drain_backend()
        return ended

    def connected(self) -> bool:
        return self.backend is not None

    @precondition(lambda self: not self.connected())
    @rule()
    def backend_connects(self) -> None:
        """The held-back connect goes ahead (nothing, if the client went away first)."""
        assert self.client is not None
        if self.client.closed and self.polled:
            # A client read by the splice poller is polled for errors even
            # while not read (paused at its limit, or after its half-close):
            # its relay learns of the reset at once and gives up the connect.
            assert settle(lambda: not self.relays()), "the relay kept its reset client while connecting"
            assert not self.gate.waiting, "the connect of a relay that ended was not cancelled"
        self.gate.open()
        if self.client.closed or self.client.reset_seen:
            # A relay reading its client learns of the reset at once and
            # gives up the connect. A reactor transport no longer read (paused
            # at its limit, or after the client's half-close) is not polled:
            # its relay connects and learns of it when it next writes to the
            # client or the backend ends: here the backend closes at once.
            # What reached the backend is a prefix of the client's bytes.
            assert settle(self.drained), "the relay outlived its reset client"
            return
        assert settle(self.backend_accepted), "the relay never connected to the backend"
        assert settle(lambda: not self.relays() or self.relays()[0].side is not None), "the relay never linked"

    def relays(self) -> list[Any]:
        assert self.proxy is not None
        return list(self.proxy.relays)

    def ends(self) -> tuple[End, End]:
        assert self.client is not None and self.backend is not None
        return self.client, self.backend

    def anything_reset(self) -> bool:
        ends = [e for e in (self.client, self.backend) if e is not None]
        return any(e.closed or e.reset_seen for e in ends)

    def end(self, which: str) -> End:
        end = self.client if which == "client" else self.backend
        assert end is not None
        return end

    # Rules

    def can(self, which: str) -> bool:
        """Whether a step may act on ``which`` (the backend only once connected; nothing after a reset)."""
        return not self.anything_reset() and (which == "client" or self.connected())

    @rule(which=st.sampled_from(["client", "backend"]), size=SIZES, seed=st.integers(0, 2**16))
    def send(self, which: str, size: int, seed: int) -> None:
        if not self.can(which):
            return
        end = self.end(which)
        if not end.write_closed:
            end.send(random.Random(seed).randbytes(size))

    @precondition(lambda self: not self.connected() and not self.anything_reset())
    @rule(size=SIZES, seed=st.integers(0, 2**16), turns=st.integers(1, 30))
    def send_while_connecting(self, size: int, seed: int, turns: int) -> None:
        """The client sends while its relay waits for the backend, and the relay reads what it will."""
        client = self.end("client")
        if not client.write_closed:
            client.send(random.Random(seed).randbytes(size))
        self.run_reactor(turns)

    @rule(which=st.sampled_from(["client", "backend"]), limit=st.integers(1, 400_000))
    def read(self, which: str, limit: int) -> None:
        if self.can(which):
            self.end(which).read(limit)

    @rule(which=st.sampled_from(["client", "backend"]))
    def half_close(self, which: str) -> None:
        if not self.can(which):
            return
        end = self.end(which)
        if not end.write_closed:
            end.half_close()

    @rule(which=st.sampled_from(["client", "backend"]))
    def reset(self, which: str) -> None:
        """The client aborts, or the backend dies."""
        if self.can(which):
            self.reset_by = which
            self.end(which).reset()

    @rule(turns=st.integers(1, 30))
    def run_reactor(self, turns: int) -> None:
        for _ in range(turns):
            turn()

    # Invariants

    @invariant()
    def nothing_lost_or_invented(self) -> None:
        """What each end received is a prefix of what the other end sent."""
        if self.client is None:
            return
        if self.backend is None:
            assert not self.client.received, "the client received bytes before any backend connected"
            return
        client, backend = self.ends()
        assert backend.received == client.sent[: len(backend.received)], "client -> backend bytes differ"
        assert client.received == backend.sent[: len(client.received)], "backend -> client bytes differ"

    @invariant()
    def relay_memory_bounded(self) -> None:
        if self.proxy is None:
            return
        for relay in self.relays():
            assert relay.buffered() < BOUND, f"relay holds {relay.buffered()} bytes"
            if relay.side is None:
                # Waiting for its backend: at most the limit, and one read past it.
                assert relay.buffered() <= PENDING_LIMIT + 65536, f"relay holds {relay.buffered()} bytes unconnected"

    # The end of an example

    def teardown(self) -> None:
        _splice._CHUNK = self.chunk
        if self.client is None:
            return
        if not self.connected():
            self.backend_connects()
        if self.backend is None:
            # The client went away while its connect was held back: nothing
            # reached a backend, and nothing is left over.
            self.client.close()
            self.check_nothing_left()
            return
        for relay in self.relays():
            splice = relay._splice
            event("relay path: " + ("piped" if splice and splice.zero_copy else "copying" if splice else "twisted"))
        event("ending: " + ("reset" if self.anything_reset() else "clean"))
        try:
            if not self.anything_reset():
                self.finish_cleanly()
            elif self.reset_by is not None and self.hears_reset(self.reset_by):
                self.ends_after_reset(self.reset_by)
        finally:
            client, backend = self.ends()
            client.close()
            backend.close()
        self.check_nothing_left()

    def hears_reset(self, which: str) -> bool:
        """
        Whether the relay hears of a reset of ``which`` whether or not it
        reads that end: a spliced relay polls both its sockets for errors,
        and the splice poller a client it reads; a reactor transport not
        being read (after its half-close, or paused) is not polled.
        """
        relays = self.relays()
        if not relays:
            return True
        (relay,) = relays
        return relay._splice is not None or (which == "client" and isinstance(relay.transport, PolledServer))

    def ends_after_reset(self, which: str) -> None:
        """
        The relay ends by itself after ``which`` reset, though the other end
        (which reads what comes) neither sends nor closes; nothing but a
        prefix of what was sent reached it.
        """
        other = self.end("backend" if which == "client" else "client")

        def gone() -> bool:
            other.read(1 << 30)
            return not self.relays()

        assert settle(gone), f"the relay outlived its reset {which} (the {other.name} still open)"
        self.nothing_lost_or_invented()

    def check_nothing_left(self) -> None:
        """Once our own sockets are closed: no relay, descriptor, delayed call or pipe is left."""
        self.gate.closed = False
        assert not self.gate.waiting, "a held-back connect was never cancelled"
        assert settle(lambda: not self.relays()), "the relay did not end after both sockets closed"
        assert settle(lambda: open_fds() <= self.fds), f"{open_fds() - self.fds} descriptors left over"
        assert len(R.getDelayedCalls()) == self.calls, "a delayed call was left over"
        assert _splice.pipes.open == self.pipes, "a splice pipe is still counted as open"

    def finish_cleanly(self) -> None:
        """
        Both ends read everything and half-close, one after the other: every
        byte arrives, the first half-close reaches the other end while it
        still sends, and the relay closes both its sockets after the second.
        """
        client, backend = self.ends()
        self.deliver_everything()
        first, second = (client, backend) if self.closer == "client" else (backend, client)
        if second.write_closed and not first.write_closed:
            first, second = second, first
        if not first.write_closed:
            first.half_close()
        assert settle(lambda: self.read_both() or second.eof), f"{first.name}'s half-close never reached {second.name}"
        if not second.write_closed:
            # The other direction still works after the half-close.
            second.send(random.Random(len(second.sent)).randbytes(100_000))
            self.deliver_everything()
            second.half_close()
        assert settle(lambda: self.read_both() or first.eof), f"{second.name}'s half-close never reached {first.name}"
        assert not client.reset_seen and not backend.reset_seen, "a clean ending was reset"
        assert client.received == backend.sent and backend.received == client.sent
        assert settle(lambda: not self.relays()), "both directions ended but the relay kept its sockets open"

    def read_both(self) -> bool:
        """Read whatever both ends have (never a condition by itself)."""
        client, backend = self.ends()
        client.read(1 << 30)
        backend.read(1 << 30)
        return False

    def deliver_everything(self) -> None:
        """Read on both ends until every byte accepted so far has arrived, and check it byte for byte."""
        client, backend = self.ends()

        def delivered() -> bool:
            self.read_both()
            return len(backend.received) >= len(client.sent) and len(client.received) >= len(backend.sent)

        assert settle(delivered), (
            f"{len(client.sent) - len(backend.received)} bytes to the backend and "
            f"{len(backend.sent) - len(client.received)} to the client never arrived"
        )
        assert bytes(backend.received) == bytes(client.sent)
        assert bytes(client.received) == bytes(backend.sent)


MODEL_SETTINGS = settings(
    # MUXTWIST_MODEL_EXAMPLES=500 for a longer search than the suite's.
    max_examples=int(os.environ.get("MUXTWIST_MODEL_EXAMPLES", "40")),
    stateful_step_count=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class RelayModelTests(unittest.SynchronousTestCase):
    """The relay model run on both relay paths."""

    def run_model(self, splice: bool) -> None:
        listeners = Listeners(self, splice)
        machine: type[RelayModel] = type(
            f"RelayModel{'Splice' if splice else 'Twisted'}",
            (RelayModel,),
            {"listeners": listeners, "splice": splice},
        )
        machine.TestCase.settings = MODEL_SETTINGS
        runner = machine.TestCase("runTest")
        runner.runTest()

    def test_twisted_relay(self) -> None:
        """The Twisted relay delivers every byte both ways, passes half-closes, and leaves nothing behind."""
        self.run_model(splice=False)

    def test_splice_relay(self) -> None:
        """The splice relay delivers every byte both ways, passes half-closes, and leaves nothing behind."""
        if not _splice.AVAILABLE:
            raise unittest.SkipTest("splice(2) is Linux only")
        self.run_model(splice=True)
