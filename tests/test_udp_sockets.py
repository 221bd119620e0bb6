"""
FlowSockets (the per-flow backend sockets read through one epoll object) and
the flow writer a target sends a flow's replies with: bounds per dispatch,
errors kept to their own socket, sockets removed mid-round, many flows
through UDPProxy on one reactor reader.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactor
from twisted.trial import unittest

from muxtwist.matchers import Prefix
from muxtwist.metrics import Metrics
from muxtwist.sniffing import Rule
from muxtwist.udp import UDPMux, UDPProxy
from muxtwist.udp._sockets import FlowSockets

from .test_udp_proxy import Backend, Client


class Owner:
    """One socket's owner, recording what FlowSockets hands it."""

    def __init__(self, sock: socket.socket, sockets: FlowSockets) -> None:
        self.sock = sock
        self.sockets = sockets
        self.recv: Any = sock.recv
        self.got: list[bytes] = []
        self.errors: list[OSError] = []
        self.deliver: Any = self.got.append

    def failed(self, error: OSError) -> None:
        """As UDPProxy does: a socket error ends the flow, so the socket is removed."""
        self.errors.append(error)
        self.sockets.remove(self.sock.fileno())


class FlowSocketsTests(unittest.SynchronousTestCase):
    use_epoll = True

    def setUp(self) -> None:
        self.reactor = MemoryReactor()

    def sockets(self, **kwargs: Any) -> FlowSockets:
        return FlowSockets(self.reactor, 65535, use_epoll=self.use_epoll, **kwargs)

    def dispatch(self) -> None:
        """What the reactor does when the sockets are readable: each reader's doRead, unless removed meanwhile."""
        for reader in list(self.reactor.getReaders()):
            if reader in self.reactor.getReaders():
                reader.doRead()

    def pair(self, sockets: FlowSockets) -> tuple[socket.socket, Owner]:
        """A datagram socket pair: the far end to write to, and the near end's owner, read by ``sockets``."""
        near, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        near.setblocking(False)
        self.addCleanup(near.close)
        self.addCleanup(far.close)
        owner = Owner(near, sockets)
        sockets.add(near.fileno(), owner)
        return far, owner

    def test_one_reader_for_many_sockets(self) -> None:
        """However many sockets are added, the reactor reads one descriptor, and stops once the last is removed."""
        sockets = self.sockets()
        owners = [self.pair(sockets)[1] for _ in range(50)]
        self.assertEqual(len(self.reactor.getReaders()), 1 if self.use_epoll else 50)
        for owner in owners:
            sockets.remove(owner.sock.fileno())
        self.assertEqual(self.reactor.getReaders(), [])
        self.assertEqual(len(sockets), 0)

    def test_every_ready_socket_read_in_one_dispatch(self) -> None:
        """One doRead delivers the waiting datagrams of every socket, in order per socket."""
        sockets = self.sockets()
        pairs = [self.pair(sockets) for _ in range(20)]
        for i, (far, _) in enumerate(pairs):
            far.send(b"%d-a" % i)
            far.send(b"%d-b" % i)
        self.dispatch()
        self.assertEqual([o.got for _, o in pairs], [[b"%d-a" % i, b"%d-b" % i] for i in range(20)])

    def test_reads_per_dispatch_are_bounded(self) -> None:
        """A socket with more waiting than max_rounds datagrams gets max_rounds per dispatch, the rest later."""
        sockets = self.sockets(max_rounds=3)
        far, owner = self.pair(sockets)
        for i in range(5):
            far.send(b"%d" % i)
        self.dispatch()
        self.assertEqual(owner.got, [b"0", b"1", b"2"])
        self.dispatch()
        self.assertEqual(owner.got, [b"0", b"1", b"2", b"3", b"4"])

    def test_socket_error_goes_to_its_owner_only(self) -> None:
        """A socket whose read fails is reported to its owner; the other sockets' datagrams are still delivered."""
        sockets = self.sockets()
        pairs = [self.pair(sockets) for _ in range(3)]

        def refused(size: int) -> bytes:
            raise ConnectionRefusedError(111, "Connection refused")

        pairs[1][1].recv = refused
        for far, _ in pairs:
            far.send(b"x")
        self.dispatch()
        self.assertEqual([o.got for _, o in pairs], [[b"x"], [], [b"x"]])
        self.assertEqual([len(o.errors) for _, o in pairs], [0, 1, 0])
        self.assertIsInstance(pairs[1][1].errors[0], ConnectionRefusedError)
        self.assertEqual(len(sockets), 2)

    def test_owner_raising_does_not_stop_the_others(self) -> None:
        """An owner whose deliver raises is logged; the other sockets are read in the same dispatch."""
        sockets = self.sockets()
        pairs = [self.pair(sockets) for _ in range(3)]

        def broken(data: bytes) -> None:
            raise RuntimeError("broken target")

        pairs[0][1].deliver = broken
        for far, _ in pairs:
            far.send(b"y")
        self.dispatch()
        self.assertEqual([o.got for _, o in pairs[1:]], [[b"y"], [b"y"]])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_socket_removed_while_its_event_is_pending_is_never_read(self) -> None:
        """When delivering to one socket removes another whose event is in the same round, that one is skipped."""
        sockets = self.sockets()
        (far_a, a), (far_b, b) = self.pair(sockets), self.pair(sockets)
        delivered: list[Owner] = []

        def remove_other(owner: Owner, other: Owner) -> Any:
            def deliver(data: bytes) -> None:
                delivered.append(owner)
                sockets.remove(other.sock.fileno())
                other.sock.close()

            return deliver

        a.deliver, b.deliver = remove_other(a, b), remove_other(b, a)
        far_a.send(b"a")
        far_b.send(b"b")
        self.dispatch()
        self.assertEqual(len(delivered), 1)
        self.assertEqual(len(sockets), 1)

    def test_last_socket_removed_during_a_dispatch(self) -> None:
        """Removing every socket from inside a dispatch ends it cleanly, and a socket added later is read again."""
        sockets = self.sockets()
        far, owner = self.pair(sockets)

        def close(data: bytes) -> None:
            owner.got.append(data)
            sockets.remove(owner.sock.fileno())

        owner.deliver = close
        far.send(b"1")
        far.send(b"2")
        self.dispatch()
        self.assertEqual(owner.got, [b"1"])
        self.assertEqual(self.reactor.getReaders(), [])
        far2, owner2 = self.pair(sockets)
        far2.send(b"again")
        self.dispatch()
        self.assertEqual(owner2.got, [b"again"])

    def test_socket_that_cannot_be_watched_leaves_nothing_behind(self) -> None:
        """A socket that cannot be added raises and changes nothing: no owner, no reader, no epoll left open."""
        if not self.use_epoll:
            raise unittest.SkipTest("only epoll refuses a descriptor (a regular file)")
        sockets = self.sockets()
        near, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(near.close)
        self.addCleanup(far.close)
        with open(self.mktemp(), "wb") as f:
            self.assertRaises(OSError, sockets.add, f.fileno(), Owner(near, sockets))
        self.assertEqual((len(sockets), self.reactor.getReaders(), sockets._epoll), (0, [], None))


class FlowSocketsWithoutEpollTests(FlowSocketsTests):
    """The same behaviour where there is no epoll: a reactor reader per socket."""

    use_epoll = False

    def test_one_reader_for_many_sockets(self) -> None:
        """Without epoll each socket is a reader of its own, and removing them all leaves none."""
        super().test_one_reader_for_many_sockets()


class FlowWriterTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_many_flows_through_one_reader(self) -> Any:
        """Forty flows relayed at once are all answered, their backend sockets read by one reactor reader."""
        backend = Backend(b"b")
        backend_port = reactor.listenUDP(0, backend, interface="127.0.0.1")
        self.addCleanup(backend_port.stopListening)
        proxy = UDPProxy(f"udp:host=127.0.0.1:port={backend_port.getHost().port}")
        mux = UDPMux([Rule(Prefix(b"q"), proxy)], metrics=Metrics())
        port = reactor.listenUDP(0, mux.protocol, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        clients = []
        for _ in range(40):
            c = Client()
            p = reactor.listenUDP(0, c, interface="127.0.0.1")
            p.connect("127.0.0.1", port.getHost().port)
            self.addCleanup(p.stopListening)
            clients.append(c)
        waits = []
        for i, c in enumerate(clients):
            waits.append(c.next_reply())
            c.transport.write(b"q%d" % i)  # type: ignore[union-attr]
        replies = yield defer.gatherResults(waits)
        self.assertEqual(replies, [b"b:q%d" % i for i in range(40)])
        self.assertEqual((proxy.flows, len(proxy._sockets)), (40, 40))
        self.assertEqual([r for r in reactor.getReaders() if isinstance(r, FlowSockets)], [proxy._sockets])
        self.assertEqual(sum(f.datagrams_out for f in mux.table.flows.values()), 40)

    @defer.inlineCallbacks
    def test_flow_whose_socket_cannot_be_watched_ends_backend_failed(self) -> Any:
        """A flow whose backend socket cannot be watched (EMFILE) ends backend_failed, its socket closed."""
        backend = Backend(b"b")
        backend_port = reactor.listenUDP(0, backend, interface="127.0.0.1")
        self.addCleanup(backend_port.stopListening)
        proxy = UDPProxy(f"udp:host=127.0.0.1:port={backend_port.getHost().port}")
        tried: list[int] = []

        def no_descriptors(fd: int, owner: Any) -> None:
            tried.append(fd)
            raise OSError(errno.EMFILE, "Too many open files")

        proxy._sockets.add = no_descriptors  # type: ignore[method-assign]
        mux = UDPMux([Rule(Prefix(b"q", name="q"), proxy)], metrics=Metrics())
        port = reactor.listenUDP(0, mux.protocol, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        c = Client()
        p = reactor.listenUDP(0, c, interface="127.0.0.1")
        p.connect("127.0.0.1", port.getHost().port)
        self.addCleanup(p.stopListening)
        c.transport.write(b"q1")  # type: ignore[union-attr]
        for _ in range(100):
            if tried:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(tried), 1)
        self.assertEqual(mux.stats.ended[("q", "backend_failed")][0], 1)
        self.assertEqual(
            (proxy.flows, proxy.failed, proxy.backends[0].failures, proxy.backends[0].active), (0, 1, 1, 0)
        )
        self.assertEqual(len(mux.table.flows), 0)
        self.assertRaises(OSError, os.fstat, tried[0])

    @defer.inlineCallbacks
    def test_writer_of_an_ended_flow_drops(self) -> Any:
        """A flow writer sends and counts while its flow lives, and drops (counted not_a_flow) once it ended."""
        target = DatagramProtocol()
        mux = UDPMux([Rule(Prefix(b"w"), target)], metrics=Metrics())
        port = reactor.listenUDP(0, mux.protocol, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        c = Client()
        p = reactor.listenUDP(0, c, interface="127.0.0.1")
        p.connect("127.0.0.1", port.getHost().port)
        self.addCleanup(p.stopListening)
        got: list[Any] = []
        target.datagramReceived = lambda data, addr: got.append(addr)  # type: ignore[method-assign]
        c.transport.write(b"w")  # type: ignore[union-attr]
        for _ in range(100):
            if got:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        addr = got[0]
        assert target.transport is not None
        self.assertIsNone(target.transport.flow_writer(("127.0.0.1", 1)))  # type: ignore[attr-defined]
        write = target.transport.flow_writer(addr)  # type: ignore[attr-defined]
        reply = c.next_reply()
        write(b"answer")
        self.assertEqual((yield reply), b"answer")
        flow = mux.table.flows[addr]
        self.assertEqual((flow.datagrams_out, flow.bytes_out), (1, 6))
        mux.end_flow(addr)
        write(b"late")
        self.assertEqual(mux.stats.dropped["not_a_flow"], 1)
        self.assertEqual(flow.datagrams_out, 1)
