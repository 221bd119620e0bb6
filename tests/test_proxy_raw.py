"""
A spliced relay's backend socket is the relay's own from its ``connect`` on
(muxtwist.proxy._raw): never a Twisted transport, never in the reactor;
where the relay cannot splice when the connect finishes, the socket is
adopted as an ordinary Twisted transport instead.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from twisted.internet import error, tcp
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from muxtwist import Rule
from muxtwist.actions import Proxy
from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers import Any as AnyMatcher
from muxtwist.proxy._poller import poller_for
from muxtwist.proxy._raw import RawTransport
from muxtwist.proxy._relay import Relay
from tests.test_proxy import _full_listener, capture_logs, logged
from tests.test_proxy_support import Echo, Peer, R, backend, connect, mux, until

LINUX = sys.platform.startswith("linux")


def _reactor_fds() -> set[int]:
    """The descriptors the reactor reads or writes now."""
    return {d.fileno() for d in (*R.getReaders(), *R.getWriters())}


def _sockets() -> int:
    """How many sockets this process has open."""
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            found += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            continue
    return found


def _relay(proxy: Proxy) -> Relay:
    (relay,) = proxy.relays
    return relay


def _echo_factory() -> Factory:
    return Factory.forProtocol(Echo)


@implementer(IMatcher)
class _UntilEndOfStream:
    """Says NEED_MORE, which the client's end of stream makes a final NO_MATCH."""

    name = "until-eof"

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        return Verdict.NEED_MORE


class RawBackendTests(unittest.TestCase):
    if not LINUX:
        skip = "splice(2) is Linux only"

    async def test_spliced_backend_is_never_a_reactor_transport(self) -> None:
        """
        A spliced relay relays over the backend socket it connected, which the reactor never watches, and closes it
        at the end.
        """
        desc, backends = backend(self)
        proxy = Proxy(desc)
        port, _ = mux(self, [Rule(AnyMatcher(), proxy, name="any")])
        before = _sockets()
        client = await connect(self, port)
        client.transport.write(b"ping")  # type: ignore[union-attr]
        await client.received_at_least(4)
        relay = _relay(proxy)
        assert relay.side is not None
        transport: Any = relay.side.transport
        self.assertIsInstance(transport, RawTransport)
        self.assertTrue(relay.spliced)
        self.assertNotIn(transport.fileno(), _reactor_fds())
        client.transport.write(b"pong")  # type: ignore[union-attr]
        await client.received_at_least(8)
        client.transport.loseWriteConnection()  # type: ignore[union-attr]
        reason = await client.closed()
        self.assertTrue(reason.check(error.ConnectionDone), reason)
        await until(lambda: not proxy.relays)
        self.assertEqual(bytes(client.received), b"pingpong")
        self.assertEqual(bytes(backends.built[0].received), b"pingpong")
        self.assertIsNone(transport.socket)
        stats = proxy.stats[desc]
        self.assertEqual((stats.active, stats.bytes_in, stats.bytes_out), (0, 8, 8))
        await until(lambda: _sockets() <= before)

    async def test_clean_end_leaves_no_closing_watch(self) -> None:
        """A spliced relay that ends both ways closes both ends itself and arms no watch for lingering ends."""
        desc, _ = backend(self)
        proxy = Proxy(desc)
        port, _ = mux(self, [Rule(AnyMatcher(), proxy, name="any")])
        client = await connect(self, port)
        client.transport.write(b"x")  # type: ignore[union-attr]
        await client.received_at_least(1)
        relay = _relay(proxy)
        client.transport.loseWriteConnection()  # type: ignore[union-attr]
        await client.closed()
        await until(lambda: not proxy.relays)
        self.assertIsNone(relay._closing)

    async def test_client_half_closed_before_connect_gets_adopted_backend(self) -> None:
        """
        A client whose end of stream came before the backend connected is relayed by Twisted over an adopted
        backend, answer and FIN included.
        """
        desc, backends = backend(self)
        proxy = Proxy(desc)
        # Decided only at the client's end of stream (as no match), then handed to the proxy.
        port, _ = mux(self, [Rule(_UntilEndOfStream(), _echo_factory(), name="never")], on_no_match=proxy)
        client = await connect(self, port)
        client.transport.write(b"request")  # type: ignore[union-attr]
        client.transport.loseWriteConnection()  # type: ignore[union-attr]
        await until(lambda: bool(backends.built) and backends.built[0].transport is not None)
        arrived = backends.built[0]
        self.assertIsInstance(arrived.transport, tcp.Server)
        await until(lambda: bool(proxy.relays) or client.lost.called)
        for relay in list(proxy.relays):
            assert relay.side is not None
            self.assertIsInstance(relay.side.transport, tcp.Connection)
            self.assertFalse(relay.spliced)
        reason = await client.closed()
        self.assertTrue(reason.check(error.ConnectionDone), reason)
        self.assertEqual(bytes(client.received), b"request")
        self.assertEqual(bytes(arrived.received), b"request")

    async def test_backend_reset_mid_stream_resets_the_client(self) -> None:
        """A backend that resets a spliced relay resets its client and is counted as failed."""

        class Resetter(Peer):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                assert self.transport is not None
                self.transport.abortConnection()  # type: ignore[attr-defined]

        desc, _ = backend(self, Resetter)
        proxy = Proxy(desc)
        port, _ = mux(self, [Rule(AnyMatcher(), proxy, name="any")])
        client = await connect(self, port)
        client.transport.write(b"boom")  # type: ignore[union-attr]
        reason = await client.closed()
        self.assertTrue(reason.check(error.ConnectionLost, error.ConnectionDone), reason)
        await until(lambda: not proxy.relays)
        self.assertEqual(proxy.stats[desc].errors.get("reset"), 1)

    async def test_idle_timeout_closes_a_raw_backend(self) -> None:
        """
        idle_timeout ends a spliced relay whose backend is the relay's own socket: both ends close, and the relay is
        gone.
        """
        desc, backends = backend(self, Echo)
        proxy = Proxy(desc, idle_timeout=0.2)
        port, _ = mux(self, [Rule(AnyMatcher(), proxy, name="any")])
        client = await connect(self, port)
        client.transport.write(b"hi")  # type: ignore[union-attr]
        await client.received_at_least(2)
        relay = _relay(proxy)
        assert relay.side is not None
        self.assertIsInstance(relay.side.transport, RawTransport)
        await client.closed(seconds=5)
        await until(lambda: not proxy.relays)
        await until(lambda: backends.built[0].lost.called)

    async def test_raw_transport_tells_its_protocol_once(self) -> None:
        """A RawTransport closed in every way closes its socket and tells its protocol once, in a later reactor turn."""
        told: list[Any] = []

        class Protocol:
            def connectionLost(self, reason: Any) -> None:
                told.append(reason)

        left, right = socket.socketpair()
        self.addCleanup(right.close)
        transport = RawTransport(left, Protocol(), R)  # type: ignore[arg-type]
        transport.loseConnection()
        transport.abortConnection()
        self.assertIsNone(transport.socket)
        self.assertEqual(left.fileno(), -1)
        self.assertEqual(told, [])
        await until(lambda: bool(told))
        transport.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(len(told), 1)
        self.assertTrue(told[0].check(error.ConnectionDone))


class ConnectInPollerTests(unittest.TestCase):
    if not LINUX:
        skip = "splice(2) is Linux only"

    async def test_connect_waits_in_the_splice_poller(self) -> None:
        """
        A spliceable relay's backend connect waits in the splice poller, not the reactor, and leaves it at its
        connect_timeout.
        """
        full = _full_listener(self)
        proxy = Proxy(f"tcp:host=127.0.0.1:port={full.getsockname()[1]}", connect_timeout=0.5)
        port, _ = mux(self, [Rule(AnyMatcher(), proxy, name="any")])
        poller = poller_for(R)
        client = await connect(self, port)
        client.transport.write(b"hello")  # type: ignore[union-attr]
        await until(lambda: len(poller) == 1)
        (waiting,) = list(poller._ends.values())
        self.assertEqual(type(waiting).__name__, "_PendingConnect")
        self.assertNotIn(waiting, R.getWriters())
        self.assertNotIn(waiting.fd, _reactor_fds())
        # The client's reading is paused while connecting: the timeout ends it all.
        await client.closed()
        await until(lambda: not proxy.relays)
        self.assertEqual(len(poller), 0)
        self.assertEqual(proxy.stats[proxy.backends[0].description].errors, {"timeout": 1})

    async def test_taken_socket_changes_hands_in_the_poller(self) -> None:
        """
        Once connected, the backend socket's registration belongs to the splice: one entry, for reading, and the
        relay works.
        """
        desc, _ = backend(self)
        proxy = Proxy(desc)
        port, _ = mux(self, [Rule(AnyMatcher(), proxy, name="any")])
        poller = poller_for(R)
        client = await connect(self, port)
        client.transport.write(b"ping")  # type: ignore[union-attr]
        await client.received_at_least(4)
        relay = _relay(proxy)
        splice = relay._splice
        assert splice is not None
        self.assertIs(poller._ends[splice.backend.fd], splice.backend)
        self.assertEqual(sorted(type(end).__name__ for end in poller._ends.values()), ["_End", "_End"])
        client.transport.write(b"pong")  # type: ignore[union-attr]
        await client.received_at_least(8)
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.closed()
        await until(lambda: not proxy.relays)
        self.assertEqual(len(poller), 0)

    async def test_reactor_stop_does_not_blame_the_backends(self) -> None:
        """
        When the stopping reactor disconnects the splice poller, each relay ends from its client's side: no backend
        is counted as having reset it.
        """
        events = capture_logs(self)
        desc, _ = backend(self)
        proxy = Proxy(desc)
        port, _ = mux(self, [Rule(AnyMatcher(), proxy, name="any")])
        clients = []
        for i in range(3):
            client = await connect(self, port)
            client.transport.write(b"ping %d" % i)  # type: ignore[union-attr]
            await client.received_at_least(6)
            clients.append(client)
        self.assertEqual(len(proxy.relays), 3)
        self.assertTrue(all(relay.spliced for relay in proxy.relays))
        # What the reactor's disconnectAll does to the poller when it stops.
        poller = poller_for(R)
        R.removeReader(poller)
        poller.connectionLost(Failure(error.ConnectionLost()))
        await until(lambda: not proxy.relays)
        for client in clients:
            await client.closed()
        self.assertEqual(logged(events, "reset the relay"), [])
        stats = proxy.stats[desc]
        self.assertEqual((stats.failures, stats.errors, stats.active), (0, {}, 0))


class SpliceableTests(unittest.SynchronousTestCase):
    if not LINUX:
        skip = "splice(2) is Linux only"

    def _server_transport(self, family: int) -> Any:
        """A Twisted server transport (TCP or UNIX) over one end of a real connected socket pair."""
        if family == socket.AF_UNIX:
            from twisted.internet import unix

            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.addCleanup(b.close)
            transport: Any = unix.Server(a, Echo(), "", None, 0, R)
        else:
            listening = socket.socket(family, socket.SOCK_STREAM)
            self.addCleanup(listening.close)
            listening.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
            listening.listen(1)
            client = socket.create_connection(listening.getsockname()[:2])
            self.addCleanup(client.close)
            a, address = listening.accept()
            transport = tcp.Server(a, Echo(), address, None, 0, R)
        self.addCleanup(transport.connectionLost, Failure(error.ConnectionDone()))
        transport.stopReading()
        return transport

    def test_only_ip_stream_sockets_are_spliceable(self) -> None:
        """TCP over IPv4 and IPv6 is spliceable; a UNIX stream, which the relay passes on its own way, is not."""
        from muxtwist.proxy._splice import spliceable

        self.assertTrue(spliceable(self._server_transport(socket.AF_INET)))
        self.assertTrue(spliceable(self._server_transport(socket.AF_INET6)))
        self.assertFalse(spliceable(self._server_transport(socket.AF_UNIX)))

    def test_the_shared_clean_end_is_a_connection_done(self) -> None:
        """Both ends of every spliced relay's clean close are told ConnectionDone, one Failure made once."""
        from muxtwist.proxy import _splice

        self.assertIsInstance(_splice._DONE.value, error.ConnectionDone)
        self.assertTrue(_splice._DONE.check(error.ConnectionDone))
        self.assertFalse(_splice._DONE.check(error.ConnectionAborted))
        self.assertIsNone(_splice._DONE.tb)
