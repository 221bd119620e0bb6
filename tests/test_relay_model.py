"""
A stateful model test of the relay of :class:`muxtwist.actions.Proxy`, on
both relay paths (the Twisted relay and the splice relay), with real
loopback sockets.

Hypothesis drives a client and a backend as plain non-blocking sockets with
small receive buffers, around a real mux listener and a real ``Proxy`` run
by the reactor: sends of any size, reads of any size or none for a while (a
slow reader: the kernel buffers fill, and the relay must pause reading the
other side, through its transports' ``pauseProducing``/``resumeProducing``
on the Twisted relay and by dropping the reader on the splice relay),
half-closes in either order, resets from either end (a backend that dies),
and reactor turns in between. Each example also draws the splice relay's
chunk size, so small examples reach its pipe path too. After every step:

- what each end has received is a prefix of what the other end's kernel
  accepted (nothing lost, duplicated, reordered or invented);
- the relay holds a bounded number of bytes (backpressure works).

At the end of every example, unless something was reset, both ends read
everything and half-close one after the other: every byte accepted reached
the other end, exactly; the first half-close reached the other end while
it could still send; and the relay closed both of its sockets by itself
once both directions had ended. In every case, once our own sockets are closed, no
descriptor and no delayed call is left over.
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
from twisted.internet import reactor
from twisted.trial import unittest

from muxtwist import Rule, SniffingFactory
from muxtwist.actions import Proxy
from muxtwist.matchers import Any as AnyMatcher
from muxtwist.proxy import _splice

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


class Listeners:
    """The mux listeners (one per relay variant) and the backend's listening socket, shared by every example."""

    def __init__(self, case: unittest.SynchronousTestCase, splice: bool) -> None:
        self.backend = socket.socket()
        small_buffers(self.backend)
        self.backend.bind(("127.0.0.1", 0))
        self.backend.listen(16)
        self.backend.setblocking(False)
        case.addCleanup(self.backend.close)
        description = f"tcp:host=127.0.0.1:port={self.backend.getsockname()[1]}"
        self.proxies = {
            idle: Proxy(description, splice=splice, idle_timeout=600.0 if idle else None) for idle in (False, True)
        }
        self.ports = {}
        for idle, proxy in self.proxies.items():
            factory = SniffingFactory([Rule(AnyMatcher(), proxy, name="relay")])
            port = R.listenTCP(0, factory, interface="127.0.0.1")
            case.addCleanup(self._stop, port, factory)
            self.ports[idle] = port.getHost().port

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
        self.fds = 0
        self.calls = 0
        self.pipes = 0
        self.chunk = _splice._CHUNK
        self.closer = "client"

    @initialize(
        idle=st.booleans(),
        first=st.binary(min_size=1, max_size=4096),
        chunk=st.sampled_from([4096, 65536]),
        closer=st.sampled_from(["client", "backend"]),
    )
    def connect(self, idle: bool, first: bytes, chunk: int, closer: str) -> None:
        """A client connects through the mux and sends its first bytes; the relay connects to the backend."""
        # The splice relay moves a direction to a pipe after one full read of
        # its chunk; a small chunk brings small examples to the pipe path.
        self.chunk = _splice._CHUNK
        _splice._CHUNK = chunk
        #: which end half-closes first at the end of the example (unless one already has).
        self.closer = closer
        self.fds = open_fds()
        self.calls = len(R.getDelayedCalls())
        self.pipes = _splice.pipes.open
        self.proxy = self.listeners.proxies[idle]
        sock = socket.socket()
        small_buffers(sock)
        sock.connect(("127.0.0.1", self.listeners.ports[idle]))
        self.client = End("client", sock)
        self.client.send(first)
        accepted: list[socket.socket] = []

        def backend_accepted() -> bool:
            try:
                accepted.append(self.listeners.backend.accept()[0])
            except BlockingIOError:
                return False
            return True

        assert settle(backend_accepted), "the relay never connected to the backend"
        self.backend = End("backend", accepted[0])
        assert settle(lambda: len(self.relays()) == 1 and self.relays()[0].side is not None)

    def relays(self) -> list[Any]:
        assert self.proxy is not None
        return list(self.proxy.relays)

    def ends(self) -> tuple[End, End]:
        assert self.client is not None and self.backend is not None
        return self.client, self.backend

    def anything_reset(self) -> bool:
        client, backend = self.ends()
        return client.closed or backend.closed or client.reset_seen or backend.reset_seen

    def end(self, which: str) -> End:
        client, backend = self.ends()
        return client if which == "client" else backend

    # Rules

    @precondition(lambda self: not self.anything_reset())
    @rule(which=st.sampled_from(["client", "backend"]), size=SIZES, seed=st.integers(0, 2**16))
    def send(self, which: str, size: int, seed: int) -> None:
        end = self.end(which)
        if not end.write_closed:
            end.send(random.Random(seed).randbytes(size))

    @precondition(lambda self: not self.anything_reset())
    @rule(which=st.sampled_from(["client", "backend"]), limit=st.integers(1, 400_000))
    def read(self, which: str, limit: int) -> None:
        self.end(which).read(limit)

    @precondition(lambda self: not self.anything_reset())
    @rule(which=st.sampled_from(["client", "backend"]))
    def half_close(self, which: str) -> None:
        end = self.end(which)
        if not end.write_closed:
            end.half_close()

    @precondition(lambda self: not self.anything_reset())
    @rule(which=st.sampled_from(["client", "backend"]))
    def reset(self, which: str) -> None:
        """The client aborts, or the backend dies."""
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
        client, backend = self.ends()
        assert backend.received == client.sent[: len(backend.received)], "client -> backend bytes differ"
        assert client.received == backend.sent[: len(client.received)], "backend -> client bytes differ"

    @invariant()
    def relay_memory_bounded(self) -> None:
        if self.proxy is None:
            return
        for relay in self.relays():
            assert relay.buffered() < BOUND, f"relay holds {relay.buffered()} bytes"

    # The end of an example

    def teardown(self) -> None:
        _splice._CHUNK = self.chunk
        if self.client is None:
            return
        for relay in self.relays():
            splice = relay._splice
            event("relay path: " + ("piped" if splice and splice.zero_copy else "copying" if splice else "twisted"))
        event("ending: " + ("reset" if self.anything_reset() else "clean"))
        try:
            if not self.anything_reset():
                self.finish_cleanly()
        finally:
            client, backend = self.ends()
            client.close()
            backend.close()
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
