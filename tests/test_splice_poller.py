"""
The poller of spliced sockets (muxtwist.proxy._poller): one epoll per
reactor, one reactor reader for every spliced relay, each ready socket
dispatched to its own end, a failing end failing its relay only, no event
ever reaching an end that has left, and an end neither read nor written
that asks for errors told of its peer's hang-up.
"""

from __future__ import annotations

import gc
import os
import select
import socket
import sys
import weakref
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet import defer, error
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial import unittest

from muxtwist import Rule
from muxtwist.actions import Proxy
from muxtwist.matchers import Any as AnyMatcher
from muxtwist.proxy import _poller, _splice
from muxtwist.proxy._relay import Relay
from tests.test_proxy_support import Echo, R, backend, connect, mux, until, wait

LINUX = sys.platform.startswith("linux")


class _Reactor:
    """The reactor as far as a poller uses it: a set of readers."""

    def __init__(self) -> None:
        self.readers: set[Any] = set()

    def addReader(self, reader: Any) -> None:
        self.readers.add(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.discard(reader)


class _End:
    """A socket a poller dispatches to, which drains what it reads and records what it is told."""

    def __init__(self, poller: _poller.Poller, sock: socket.socket, batch: list[int], errors: bool = False) -> None:
        self.poller = poller
        self.socket = sock
        sock.setblocking(False)
        self.fd = sock.fileno()
        self.reading = True
        self.writing = False
        self.events = 0
        #: whether it stays registered for errors alone when neither read nor written.
        self.errors = errors
        #: times it was told of an error or a hang-up.
        self.erred = 0
        self.left = False
        self.raises = False
        self.reads = 0
        self.writes = 0
        self.lost: Failure | None = None
        self.got = 0
        #: the poll batch now (shared), and the one in which it was registered.
        self.batches = batch
        self.batch = batch[0]
        #: called on each read (a test's hook into the middle of a batch).
        self.on_read: Any = None
        self.stale: list[str] = []

    def doRead(self) -> None:
        self._check("read")
        self.reads += 1
        if self.on_read is not None:
            self.on_read(self)
        if self.raises:
            raise RuntimeError("this end breaks")
        try:
            while True:
                data = self.socket.recv(4096)
                if not data:
                    # Its peer has gone: stop reading, as the relay does at an end of file.
                    self.reading = False
                    self.poller.update(self)
                    return
                self.got += len(data)
        except BlockingIOError:
            pass

    def doWrite(self) -> None:
        self._check("write")
        self.writes += 1
        self.writing = False
        self.poller.update(self)

    def doError(self) -> None:
        self._check("error")
        if not self.errors or self.reading or self.writing:
            self.stale.append(f"error while errors={self.errors} reading={self.reading} writing={self.writing}")
        self.erred += 1
        # As a relay: the connection is lost, its socket closed.
        self.leave()

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason
        self.leave()

    def _check(self, what: str) -> None:
        if self.left:
            self.stale.append(f"{what} after leaving")
        if self.batch == self.batches[0]:
            self.stale.append(f"{what} in the batch that registered it")

    def leave(self) -> None:
        """Unregistered, then its socket closed (as a relay's stop, then its transport's close)."""
        if self.left:
            return
        self.left = True
        self.reading = self.writing = False
        self.poller.unregister(self)
        self.socket.close()


class PollerMachine(RuleBasedStateMachine):
    """
    A poller on a memory reactor, driven by registrations, peers writing,
    ends failing, closing and being replaced (their descriptor numbers
    reused) in the middle of a batch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reactor = _Reactor()
        self.poller = _poller.Poller(self.reactor)
        self.batch = [0]
        self.ends: list[_End] = []
        self.peers: dict[_End, socket.socket] = {}
        self.sent: dict[_End, int] = {}
        self.everyone: list[_End] = []
        #: ends whose peer has closed (hung up).
        self.hung: set[_End] = set()
        #: hung-up ends that must be told of it.
        self.told: set[_End] = set()

    def teardown(self) -> None:
        for end in self.ends:
            end.leave()
        for peer in self.peers.values():
            peer.close()
        if self.poller._epoll is not None:
            self.poller._epoll.close()

    def _open(self, errors: bool = False) -> _End:
        ours, peer = socket.socketpair()
        peer.setblocking(False)
        end = _End(self.poller, ours, self.batch, errors)
        self.poller.update(end)
        self.ends.append(end)
        self.everyone.append(end)
        self.peers[end] = peer
        self.sent[end] = 0
        return end

    def _close(self, end: _End) -> None:
        end.leave()
        self.ends.remove(end)
        self.peers.pop(end).close()
        self.hung.discard(end)
        self.told.discard(end)

    @rule(errors=st.booleans())
    def open(self, errors: bool) -> None:
        self._open(errors)

    @precondition(lambda self: self.ends)
    @rule(which=st.integers(0, 63), size=st.integers(1, 3000))
    def peer_sends(self, which: int, size: int) -> None:
        end = self.ends[which % len(self.ends)]
        if end in self.hung:
            return
        try:
            self.sent[end] += self.peers[end].send(b"x" * size)
        except BlockingIOError:
            pass

    @precondition(lambda self: self.ends)
    @rule(which=st.integers(0, 63))
    def peer_hangs_up(self, which: int) -> None:
        """The peer closes: a hang-up on the end, reported whatever its interest."""
        end = self.ends[which % len(self.ends)]
        if end not in self.hung:
            self.hung.add(end)
            if end.events and end.errors:
                # Registered, it stays so (for errors alone, if nothing else) until told.
                self.told.add(end)
            self.peers[end].close()

    @precondition(lambda self: self.ends)
    @rule(which=st.integers(0, 63), reading=st.booleans(), writing=st.booleans())
    def interest(self, which: int, reading: bool, writing: bool) -> None:
        end = self.ends[which % len(self.ends)]
        if end.lost is None and (end.reading or not reading):
            end.reading = reading
        end.writing = writing
        self.poller.update(end)

    @precondition(lambda self: self.ends)
    @rule(which=st.integers(0, 63))
    def breaks(self, which: int) -> None:
        self.ends[which % len(self.ends)].raises = True

    @precondition(lambda self: self.ends)
    @rule(which=st.integers(0, 63))
    def close(self, which: int) -> None:
        self._close(self.ends[which % len(self.ends)])

    @precondition(lambda self: len(self.ends) >= 2)
    @rule(which=st.integers(0, 63), other=st.integers(0, 63), data=st.booleans())
    def closes_another_mid_batch(self, which: int, other: int, data: bool) -> None:
        """When ``which`` is read, it closes another end and opens a new one (likely on the same number)."""
        end = self.ends[which % len(self.ends)]
        victim = self.ends[(which + 1 + other) % len(self.ends)]
        if victim is end:
            return

        def swap(reader: _End) -> None:
            reader.on_read = None
            if victim in self.ends:
                self._close(victim)
                new = self._open()
                if data:
                    self.sent[new] += self.peers[new].send(b"new")

        end.on_read = swap
        # The reader ready first, then the victim: its event comes later in the same batch.
        for ready in (end, victim):
            if ready in self.hung:
                continue
            try:
                self.sent[ready] += self.peers[ready].send(b"old")
            except BlockingIOError:
                pass

    @rule(rounds=st.integers(1, 3))
    def poll(self, rounds: int) -> None:
        for _ in range(rounds):
            self.batch[0] += 1
            self.poller.doRead()
            self._forget_gone()
        if len(self.ends) <= _poller.MAX_EVENTS and not any(e.on_read for e in self.ends):
            # Every healthy end that wants to read has read all its peer sent (none starved by another failing).
            self.batch[0] += 1
            self.poller.doRead()
            for end in self.ends:
                if end.lost is None and end.reading and not end.raises:
                    assert end.got == self.sent[end], (end.got, self.sent[end])
            self.batch[0] += 1
            self.poller.doRead()
            self._forget_gone()
            for end in self.ends:
                # Read to its end of file or written, then registered for errors alone:
                # after two turns, a hung-up end that asks for errors has been told.
                if end in self.told and not end.raises:
                    raise AssertionError(f"a hang-up never reported (events={end.events})")

    def _forget_gone(self) -> None:
        for end in list(self.ends):
            if end.lost is not None or end.erred:
                self.ends.remove(end)
                self.peers.pop(end).close()
                self.hung.discard(end)
                self.told.discard(end)

    @invariant()
    def errors_only_where_asked(self) -> None:
        for end in self.ends:
            if end.events and not (end.reading or end.writing):
                assert end.errors, "an end that wants nothing is registered though it asks for no errors"

    @invariant()
    def no_stale_dispatch(self) -> None:
        for end in self.everyone:
            assert not end.stale, end.stale

    @invariant()
    def registered_with_reactor_while_holding_sockets(self) -> None:
        holding = any(e.events for e in self.ends)
        assert (self.poller in self.reactor.readers) == holding
        assert len(self.poller) == sum(1 for e in self.ends if e.events)
        # Its epoll descriptor is open exactly while it holds sockets.
        assert (self.poller._epoll is not None) == holding

    @invariant()
    def only_failing_ends_fail(self) -> None:
        for end in self.everyone:
            if end.lost is not None:
                assert end.raises and end.lost.check(RuntimeError)


class PollerModelTests(unittest.SynchronousTestCase):
    def test_poller_model(self) -> None:
        """Under any order of registrations, failures, closes and reuse mid-batch, events reach only live ends."""
        if not LINUX:
            raise unittest.SkipTest("epoll is Linux's")
        examples = int(os.environ.get("MUXTWIST_MODEL_EXAMPLES", "60"))
        machine = settings(
            max_examples=examples,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )(PollerMachine)
        machine.TestCase().runTest()


class PollerShutdownTests(unittest.SynchronousTestCase):
    def test_reactor_disconnecting_the_poller_ends_every_relay(self) -> None:
        """When the stopping reactor disconnects the poller, each of its sockets is lost with that reason."""
        if not LINUX:
            raise unittest.SkipTest("epoll is Linux's")
        reactor = _Reactor()
        poller = _poller.Poller(reactor)
        self.addCleanup(lambda: poller._epoll.close() if poller._epoll is not None else None)
        ends = []
        for _ in range(3):
            ours, peer = socket.socketpair()
            self.addCleanup(peer.close)
            end = _End(poller, ours, [0])
            self.addCleanup(end.leave)
            poller.update(end)
            ends.append(end)
        self.assertEqual(reactor.readers, {poller})
        poller.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual([bool(e.lost and e.lost.check(error.ConnectionLost)) for e in ends], [True] * 3)
        self.assertEqual(len(poller), 0)


class _CountingEpoll:
    """An epoll that counts its ``modify`` calls."""

    def __init__(self, epoll: Any) -> None:
        self.epoll = epoll
        self.modified = 0

    def modify(self, fd: int, events: int) -> None:
        self.modified += 1
        self.epoll.modify(fd, events)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.epoll, name)


class PollerTurnTests(unittest.SynchronousTestCase):
    def test_one_turn_serves_every_ready_socket(self) -> None:
        """One doRead serves every ready socket, more than MAX_EVENTS of them (a capped turn starved connects)."""
        if not LINUX:
            raise unittest.SkipTest("epoll is Linux's")
        reactor = _Reactor()  # held here: a poller holds its reactor weakly
        poller = _poller.Poller(reactor)
        self.addCleanup(lambda: poller._epoll.close() if poller._epoll is not None else None)
        ends = []
        for _ in range(_poller.MAX_EVENTS * 3):
            ours, peer = socket.socketpair()
            self.addCleanup(peer.close)
            end = _End(poller, ours, [-1])
            self.addCleanup(end.leave)
            poller.update(end)
            peer.send(b"x")
            ends.append(end)
        poller.doRead()
        self.assertEqual(sum(end.reads for end in ends), len(ends))


class PollerHandOverTests(unittest.SynchronousTestCase):
    def _two_ends(self, first_writes: bool) -> tuple[_poller.Poller, _CountingEpoll, _End, _End, socket.socket]:
        if not LINUX:
            raise unittest.SkipTest("epoll is Linux's")
        self.reactor = _Reactor()  # held here: a poller holds its reactor weakly
        poller = _poller.Poller(self.reactor)
        ours, peer = socket.socketpair()
        self.addCleanup(peer.close)
        first = _End(poller, ours, [-1])
        first.reading, first.writing = not first_writes, first_writes
        poller.update(first)
        epoll = _CountingEpoll(poller._epoll)
        poller._epoll = epoll  # type: ignore[assignment]
        self.addCleanup(epoll.epoll.close)
        second = _End(poller, ours, [-1])
        self.addCleanup(second.leave)
        poller.update(second)
        return poller, epoll, first, second, peer

    def test_a_socket_taken_over_with_the_same_interest_costs_no_system_call(self) -> None:
        """A second end reading a socket the poller already reads for another takes it over without a modify."""
        poller, epoll, first, second, peer = self._two_ends(first_writes=False)
        self.assertEqual(epoll.modified, 0)
        self.assertEqual(first.events, 0)
        peer.send(b"ping")
        poller.doRead()
        self.assertEqual((first.reads, second.reads, second.got), (0, 1, 4))
        # The first end leaving (its transport's stopReading) takes nothing from the second.
        first.reading = False
        poller.update(first)
        peer.send(b"pong")
        poller.doRead()
        self.assertEqual((second.reads, second.got), (2, 8))

    def test_a_socket_taken_over_with_another_interest_is_modified_once(self) -> None:
        """A second end reading a socket the poller watched for writing takes it over with one modify."""
        poller, epoll, first, second, peer = self._two_ends(first_writes=True)
        self.assertEqual(epoll.modified, 1)
        peer.send(b"ping")
        poller.doRead()
        self.assertEqual((first.writes, second.reads, second.got), (0, 1, 4))


class _Counter(_End):
    """An end on the real reactor that fires ``done`` once it has read ``expected`` bytes."""

    def __init__(self, poller: _poller.Poller, sock: socket.socket, expected: int, done: Any) -> None:
        super().__init__(poller, sock, [-1])
        self.expected = expected
        self.done = done

    def doRead(self) -> None:
        super().doRead()
        if self.got >= self.expected and not self.done.called:
            self.done.callback(self.got)


class PollerForTests(unittest.SynchronousTestCase):
    def test_a_reactor_nothing_else_holds_is_collected(self) -> None:
        """poller_for keeps no reactor alive, nor its poller: the last one asked about neither."""
        first, last = MemoryReactorClock(), MemoryReactorClock()
        poller = _poller.poller_for(first)
        self.assertIs(_poller.poller_for(first), poller)
        self.assertIsNot(_poller.poller_for(last), poller)
        self.assertIs(_poller.poller_for(last), _poller.poller_for(last))
        refs = [weakref.ref(first), weakref.ref(last), weakref.ref(poller), weakref.ref(_poller.poller_for(last))]
        del first, last, poller
        gc.collect()
        self.assertEqual([ref() for ref in refs], [None] * 4)

    def test_a_poller_is_the_same_while_its_reactor_lives(self) -> None:
        """Asked about another reactor in between, poller_for still answers the first reactor's own poller."""
        first, other = MemoryReactorClock(), MemoryReactorClock()
        poller = _poller.poller_for(first)
        _poller.poller_for(other)
        gc.collect()
        self.assertIs(_poller.poller_for(first), poller)


class PollerReactorTests(unittest.TestCase):
    """The poller on the running reactor (run with --reactor=asyncio too)."""

    def setUp(self) -> None:
        if not LINUX:
            raise unittest.SkipTest("epoll is Linux's")

    async def test_one_failing_end_does_not_stop_the_others(self) -> None:
        """Many sockets in one poller all get their bytes while one of them raises at every read."""
        poller = _poller.poller_for(R)
        ends: list[_Counter] = []
        peers: list[socket.socket] = []
        for n in range(40):
            ours, peer = socket.socketpair()
            peers.append(peer)
            self.addCleanup(peer.close)
            end = _Counter(poller, ours, 1000, defer.Deferred())
            end.raises = n == 7
            self.addCleanup(end.leave)
            ends.append(end)
            poller.update(end)
        self.assertIn(poller, R.getReaders())
        for peer in peers:
            peer.sendall(b"y" * 1000)
        healthy = [e for e in ends if not e.raises]
        await wait(defer.gatherResults([e.done for e in healthy]), 10)
        await until(lambda: ends[7].lost is not None)
        self.assertTrue(ends[7].lost.check(RuntimeError))  # type: ignore[union-attr]
        self.assertEqual([e.lost for e in healthy], [None] * len(healthy))
        for end in ends:
            end.leave()
        self.assertNotIn(poller, R.getReaders())

    async def test_spliced_relays_share_one_reactor_reader(self) -> None:
        """However many relays are spliced, the reactor reads one descriptor for them all, and none once they end."""
        if not _splice.AVAILABLE:
            raise unittest.SkipTest("splice(2) is Linux's")
        desc, backends = backend(self, Echo)
        proxy = Proxy(desc, splice=True)
        port, _ = mux(self, [Rule(AnyMatcher(), proxy, name="relay")])
        clients = []
        for n in range(8):
            client = await connect(self, port)
            client.transport.write(b"ping %d" % n)  # type: ignore[union-attr]
            clients.append(client)
        for client in clients:
            await client.received_at_least(6)
        await until(lambda: len(proxy.relays) == 8 and all(r.spliced for r in proxy.relays))

        def ours() -> list[Any]:
            return [r for r in R.getReaders() if type(r).__module__.startswith("muxtwist.proxy")]

        self.assertEqual([type(r).__name__ for r in ours()], ["Poller"])
        for n, client in enumerate(clients):
            client.transport.write(b" again %d" % n)  # type: ignore[union-attr]
        for n, client in enumerate(clients):
            expected = b"ping %d again %d" % (n, n)
            self.assertEqual(await client.received_at_least(len(expected)), expected)
        for client in clients:
            client.transport.loseConnection()  # type: ignore[union-attr]
            await client.closed()
        await until(lambda: not proxy.relays)
        self.assertEqual(ours(), [])

    async def test_no_descriptor_left_open_once_every_relay_ended(self) -> None:
        """The poller's epoll descriptor exists only while it holds sockets: none is left once the relays end."""
        if not _splice.AVAILABLE:
            raise unittest.SkipTest("splice(2) is Linux's")
        desc, backends = backend(self, Echo)
        proxy = Proxy(desc, splice=True)
        port, _ = mux(self, [Rule(AnyMatcher(), proxy, name="relay")])

        def epolls() -> int:
            return sum(os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventpoll]" for fd in _fds())

        before = epolls()
        for round_ in range(2):
            client = await connect(self, port)
            client.transport.write(b"ping %d" % round_)  # type: ignore[union-attr]
            await client.received_at_least(6)
            await until(lambda: len(proxy.relays) == 1 and all(r.spliced for r in proxy.relays))
            self.assertEqual(epolls(), before + 1)
            client.transport.loseConnection()  # type: ignore[union-attr]
            await client.closed()
            await until(lambda: not proxy.relays)
            self.assertEqual(epolls(), before)

    async def test_a_relay_ended_both_ways_closes_its_backend_though_its_client_raised(self) -> None:
        """
        Once both ways have ended, the splice leaves the poller without a
        system call and closes both sockets: the backend's is closed though
        what its client's close ran raised, or it would stay open in the
        epoll, hung up and reported at every poll to a poller that no longer
        knows it (a busy loop for as long as another relay is polled).
        """
        if not _splice.AVAILABLE:
            raise unittest.SkipTest("splice(2) is Linux's")
        desc, backends = backend(self, Echo)
        proxy = Proxy(desc, splice=True)
        port, _ = mux(self, [Rule(AnyMatcher(), proxy, name="relay")])
        kept = await connect(self, port)
        kept.transport.write(b"kept")  # type: ignore[union-attr]
        await kept.received_at_least(4)
        client = await connect(self, port)
        client.transport.write(b"ping")  # type: ignore[union-attr]
        await client.received_at_least(4)
        await until(lambda: len(proxy.relays) == 2 and all(r.spliced for r in proxy.relays))
        (ending,) = [r for r in proxy.relays if r.transport.getPeer().port == client.transport.getHost().port]  # type: ignore[union-attr]
        original = Relay.connectionLost

        def raising(relay: Relay, reason: Failure) -> None:
            original(relay, reason)
            if relay is ending:
                raise RuntimeError("a fault in what the client's close runs")

        self.patch(Relay, "connectionLost", raising)
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.closed()
        await until(lambda: len(proxy.relays) == 1, 5)
        poller = _poller.poller_for(R)
        self.assertEqual(len(poller), 2)
        # Nothing happens on the kept relay: the poller has nothing to report.
        self.assertEqual(select.select([poller.fileno()], [], [], 0.2)[0], [])


def _fds() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        found.append(fd)
    return found
