"""
UDPProxy and the UDP listener on real loopback sockets: per-flow backend
sockets, replies from the listening socket, ICMP errors, balance, limits.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock, deferLater
from twisted.trial import unittest

from muxtwist.matchers import Prefix
from muxtwist.metrics import Metrics
from muxtwist.sniffing import Rule
from muxtwist.udp import UDPListener, UDPMux, UDPProxy, parse_udp_description
from muxtwist.udp.mux import MAX_DATAGRAM
from muxtwist.udp.proxy import parse_backend

from .udp_helpers import Echo


class Client(DatagramProtocol):
    """A real UDP client connected to one address, collecting replies."""

    def __init__(self) -> None:
        self.replies: list[tuple[bytes, Any]] = []
        self._waiting: list[defer.Deferred[bytes]] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.replies.append((datagram, addr))
        if self._waiting:
            self._waiting.pop(0).callback(datagram)

    def next_reply(self, timeout: float = 5.0) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiting.append(d)
        d.addTimeout(timeout, reactor)
        return d


class Backend(DatagramProtocol):
    """A backend that answers each datagram with a tag and the source port it came from."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self.sources: list[int] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.sources.append(addr[1])
        assert self.transport is not None
        self.transport.write(self.tag + b":" + datagram, addr)


class ProxyTests(unittest.TestCase):
    def listen(self, proto: DatagramProtocol) -> int:
        port = reactor.listenUDP(0, proto, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def mux(self, rules: list[Rule], **kwargs: Any) -> tuple[UDPMux, int]:
        mux = UDPMux(rules, metrics=Metrics(), **kwargs)
        return mux, self.listen(mux.protocol)

    def client(self, port: int) -> Client:
        c = Client()
        p = reactor.listenUDP(0, c, interface="127.0.0.1")
        p.connect("127.0.0.1", port)
        self.addCleanup(p.stopListening)
        return c

    @defer.inlineCallbacks
    def test_relays_flow_and_replies_from_listening_socket(self) -> Any:
        """A flow is relayed to the backend over its own socket; replies reach the client from the listening port."""
        backend = Backend(b"b1")
        backend_port = self.listen(backend)
        proxy = UDPProxy(f"udp:host=127.0.0.1:port={backend_port}")
        _, port = self.mux([Rule(Prefix(b"ping"), proxy)])
        c = self.client(port)
        c.transport.write(b"ping 1")  # type: ignore[union-attr]
        self.assertEqual((yield c.next_reply()), b"b1:ping 1")
        c.transport.write(b"ping 2")  # type: ignore[union-attr]
        self.assertEqual((yield c.next_reply()), b"b1:ping 2")
        self.assertEqual({addr[1] for _, addr in c.replies}, {port})
        self.assertEqual(len(set(backend.sources)), 1)
        other = self.client(port)
        other.transport.write(b"ping 3")  # type: ignore[union-attr]
        self.assertEqual((yield other.next_reply()), b"b1:ping 3")
        self.assertEqual(len(set(backend.sources)), 2)
        self.assertEqual(proxy.flows, 2)

    @defer.inlineCallbacks
    def test_icmp_error_ends_that_flow_only(self) -> Any:
        """A backend that answers with ICMP port unreachable ends that flow (backend_failed); others go on."""
        dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dead.bind(("127.0.0.1", 0))
        dead_port = dead.getsockname()[1]
        dead.close()
        backend = Backend(b"ok")
        live = UDPProxy(f"udp:host=127.0.0.1:port={self.listen(backend)}")
        broken = UDPProxy(f"udp:host=127.0.0.1:port={dead_port}")
        mux, port = self.mux([Rule(Prefix(b"live", name="live"), live), Rule(Prefix(b"dead", name="dead"), broken)])
        good = self.client(port)
        good.transport.write(b"live")  # type: ignore[union-attr]
        yield good.next_reply()
        bad = self.client(port)
        bad.transport.write(b"dead 1")  # type: ignore[union-attr]
        for _ in range(100):
            if broken.failed:
                break
            bad.transport.write(b"dead again")  # type: ignore[union-attr]
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(broken.failed, 1)
        self.assertEqual(broken.backends[0].failures, 1)
        self.assertEqual(mux.stats.ended[("dead", "backend_failed")][0], 1)
        self.assertEqual(len(mux.table.flows), 1)
        good.transport.write(b"live again")  # type: ignore[union-attr]
        self.assertEqual((yield good.next_reply()), b"ok:live again")

    @defer.inlineCallbacks
    def test_icmp_error_after_a_single_datagram_ends_the_flow(self) -> Any:
        """One datagram to a closed backend port ends its flow as backend_failed, with no later datagram needed."""
        dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dead.bind(("127.0.0.1", 0))
        dead_port = dead.getsockname()[1]
        dead.close()
        broken = UDPProxy(f"udp:host=127.0.0.1:port={dead_port}")
        mux, port = self.mux([Rule(Prefix(b"dead", name="dead"), broken)])
        self.client(port).transport.write(b"dead 1")  # type: ignore[union-attr]
        for _ in range(200):
            if broken.failed:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(broken.failed, 1)
        self.assertEqual(mux.stats.ended[("dead", "backend_failed")][0], 1)
        self.assertEqual((len(mux.table.flows), broken.flows, broken.backends[0].active), (0, 0, 0))

    @defer.inlineCallbacks
    def test_idle_timeout_closes_backend_socket(self) -> Any:
        """After idle_timeout without traffic the flow ends and its backend socket is closed."""
        backend = Backend(b"b")
        proxy = UDPProxy(f"udp:host=127.0.0.1:port={self.listen(backend)}", idle_timeout=3.0)
        clock = Clock()
        mux = UDPMux([Rule(Prefix(b"x"), proxy)], metrics=Metrics(), reactor=clock)
        port = self.listen(mux.protocol)
        c = self.client(port)
        c.transport.write(b"x")  # type: ignore[union-attr]
        yield c.next_reply()
        side = proxy._sides[next(iter(proxy._sides))]
        clock.advance(3.0)
        self.assertEqual(proxy.flows, 0)
        self.assertEqual(side.backend.active, 0)
        self.assertEqual(side.sock.fileno(), -1)
        self.assertEqual(len(proxy._sockets), 0)
        self.assertNotIn(proxy._sockets, reactor.getReaders())

    @defer.inlineCallbacks
    def test_balance_and_max_flows(self) -> Any:
        """round_robin spreads flows over backends; flows past max_flows are ended as rejected."""
        one, two = Backend(b"1"), Backend(b"2")
        proxy = UDPProxy(
            [f"udp:host=127.0.0.1:port={self.listen(one)}", f"udp:host=127.0.0.1:port={self.listen(two)}"],
            max_flows=2,
        )
        mux, port = self.mux([Rule(Prefix(b"x"), proxy)])
        tags = []
        for _ in range(2):
            c = self.client(port)
            c.transport.write(b"x")  # type: ignore[union-attr]
            tags.append((yield c.next_reply()))
        self.assertEqual(sorted(tags), [b"1:x", b"2:x"])
        third = self.client(port)
        third.transport.write(b"x")  # type: ignore[union-attr]
        # Its datagram may take a while to be read on a busy host: wait for the rejection, not a fixed time.
        for _ in range(1000):
            if proxy.rejected:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        yield deferLater(reactor, 0.1, lambda: None)  # a reply, had there been one, would be here by now
        self.assertEqual(third.replies, [])
        self.assertEqual(proxy.rejected, 1)
        self.assertEqual(mux.stats.ended[("prefix", "rejected")][0], 1)

    @defer.inlineCallbacks
    def test_largest_datagrams_relayed_whole(self) -> Any:
        """Datagrams of the largest UDP size pass whole both ways through a UDPListener and UDPProxy."""
        backend = Backend(b"")
        backend_port = reactor.listenUDP(0, backend, interface="127.0.0.1", maxPacketSize=MAX_DATAGRAM)
        self.addCleanup(backend_port.stopListening)
        proxy = UDPProxy(f"udp:host=127.0.0.1:port={backend_port.getHost().port}")
        mux = UDPMux([Rule(Prefix(b"big"), proxy)], metrics=Metrics())
        listener = UDPListener("udp:0:interface=127.0.0.1", mux, reactor)
        listener.startService()
        self.addCleanup(listener.stopService)
        c = Client()
        p = reactor.listenUDP(0, c, interface="127.0.0.1", maxPacketSize=MAX_DATAGRAM)
        p.connect("127.0.0.1", listener.port.getHost().port)
        self.addCleanup(p.stopListening)
        payload = b"big" + bytes(range(256)) * 255 + b"x" * 223
        p.write(payload)
        reply = yield c.next_reply()
        self.assertEqual(len(payload), 65506)
        self.assertEqual(reply, b":" + payload)  # 65507 bytes back

    @defer.inlineCallbacks
    def test_in_process_target_on_real_socket(self) -> Any:
        """A DatagramProtocol served in-process answers a real client through the listening socket."""
        _, port = self.mux([Rule(Prefix(b"hi"), Echo())])
        c = self.client(port)
        c.transport.write(b"hi there")  # type: ignore[union-attr]
        self.assertEqual((yield c.next_reply()), b"HI THERE")


class DescriptionTests(unittest.SynchronousTestCase):
    def test_listener_descriptions(self) -> None:
        """udp:PORT, interface=, port=, and udp6 with escaped colons parse; nonsense is a clear error."""
        self.assertEqual(parse_udp_description("udp:443").port, 443)
        self.assertEqual(parse_udp_description("udp:443:interface=127.0.0.1").interface, "127.0.0.1")
        self.assertEqual(parse_udp_description("udp:port=53").port, 53)
        self.assertEqual(parse_udp_description("udp6:443").interface, "::")
        self.assertEqual(parse_udp_description("udp6:443:interface=\\:\\:1").interface, "::1")
        for bad in ("udp:", "udp:x", "udp:443:bogus=1", "udp6:443:interface=127.0.0.1", "udp:70000"):
            with self.assertRaises(ValueError):
                parse_udp_description(bad)

    def test_backend_descriptions(self) -> None:
        """Backends are udp:host=...:port=...; a bad one is a ValueError naming it."""
        b = parse_backend("udp:host=localhost:port=5300")
        self.assertEqual((b.port, b.family in (socket.AF_INET, socket.AF_INET6)), (5300, True))
        self.assertEqual(parse_backend("udp:host=\\:\\:1:port=53").host, "::1")
        for bad in ("tcp:host=a:port=1", "udp:host=127.0.0.1", "udp:host=127.0.0.1:port=x", "udp:port=0"):
            with self.assertRaises(ValueError) as e:
                parse_backend(bad)
            self.assertIn(bad, str(e.exception))
