"""
A listener whose rules only relay reads its clients in the splice poller
from their accept on (muxtwist.proxy._polled): Twisted's TCP transport,
dispatched as the reactor would, never registered with the reactor.

The relay tests of tests/test_proxy.py run on this path too (the
``...Polled`` classes); these are the listener's choice and the dispatch.
"""

from __future__ import annotations

import select
import socket
import sys
from typing import Any

from twisted.internet import defer, error, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from muxtwist import Rule, SniffingFactory
from muxtwist._listener import Listener
from muxtwist.actions import Proxy
from muxtwist.matchers import Any as AnyMatcher
from muxtwist.matchers import Prefix
from muxtwist.proxy import _splice
from muxtwist.proxy._polled import PolledServer, _Readiness
from tests.test_proxy_support import Echo, backend, connect, until, wait

R: Any = reactor


def _reactor_fds() -> set[int]:
    return {d.fileno() for d in (*R.getReaders(), *R.getWriters())}


class ListenerChoiceTests(unittest.TestCase):
    if not _splice.AVAILABLE:
        skip = "the splice poller is Linux only"

    def _listen(self, factory: SniffingFactory) -> int:
        listener = Listener("tcp:0:interface=127.0.0.1", factory, R)
        listener.privilegedStartService()
        listener.startService()

        async def stop() -> None:
            await listener.stopService()
            factory.abort_all()
            await wait(factory.when_idle(), 5)

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
        return int(listener.port.getHost().port)

    async def test_rules_that_only_relay_are_read_by_the_poller(self) -> None:
        """Behind rules that only relay, a client waiting to be sniffed is a PolledServer the reactor does not watch."""
        desc, _ = backend(self, Echo)
        factory = SniffingFactory([Rule(Prefix(b"hello"), Proxy(desc)), Rule(AnyMatcher(), Proxy(desc))])
        port = self._listen(factory)
        client = await connect(self, port)
        await until(lambda: len(factory.connections) == 1)
        (sniffer,) = factory.connections
        transport: Any = sniffer.transport
        self.assertIsInstance(transport, PolledServer)
        self.assertNotIn(transport.fileno(), _reactor_fds())
        client.transport.write(b"hello there")  # type: ignore[union-attr]
        self.assertEqual(await client.received_at_least(11), b"hello there")

    async def test_rules_with_an_in_process_winner_keep_the_reactor_transport(self) -> None:
        """A listener with any rule or fallback that is not a relay gives its clients Twisted's own transport."""
        desc, _ = backend(self, Echo)
        factory = SniffingFactory([Rule(Prefix(b"hello"), Proxy(desc))], on_no_match=Factory.forProtocol(Protocol))
        port = self._listen(factory)
        await connect(self, port)
        await until(lambda: len(factory.connections) == 1)
        (sniffer,) = factory.connections
        self.assertNotIsInstance(sniffer.transport, PolledServer)
        self.assertIn(sniffer.transport.fileno(), _reactor_fds())  # type: ignore[union-attr]

    async def test_a_reload_decides_for_new_connections(self) -> None:
        """After set_rules adds an in-process rule, new clients get the reactor's transport; earlier ones keep it."""
        desc, _ = backend(self, Echo)
        factory = SniffingFactory([Rule(Prefix(b"hello"), Proxy(desc))])
        port = self._listen(factory)
        await connect(self, port)
        await until(lambda: len(factory.connections) == 1)
        (first,) = factory.connections
        factory.set_rules([Rule(Prefix(b"hello"), Proxy(desc)), Rule(AnyMatcher(), Factory.forProtocol(Protocol))])
        await connect(self, port)
        await until(lambda: len(factory.connections) == 2)
        (second,) = factory.connections - {first}
        self.assertIsInstance(first.transport, PolledServer)
        self.assertNotIsInstance(second.transport, PolledServer)

    async def test_half_close_while_sniffing_ends_the_sniff_and_is_passed_on(self) -> None:
        """A client half-closing before the rules decide is relayed by the fallback, its end of stream passed on."""
        desc, backends = backend(self, Echo)
        factory = SniffingFactory([Rule(Prefix(b"hello"), Proxy(desc))], on_no_match=Proxy(desc))
        port = self._listen(factory)
        client = await connect(self, port)
        client.transport.write(b"hell")  # type: ignore[union-attr]
        client.transport.loseWriteConnection()  # type: ignore[union-attr]
        server = await wait(backends.arrived)
        await wait(server.eof)
        await wait(client.eof)
        self.assertEqual((bytes(server.received), bytes(client.received)), (b"hell", b"hell"))
        await client.closed()
        self.assertEqual(factory.stats["on_no_match"].outcomes, {"no_match": 1})


class _Transport:
    """What a _Readiness dispatches to: doRead/doWrite results and what the dispatch did."""

    def __init__(self, result: Any, raises: bool = False) -> None:
        self.result = result
        self.raises = raises
        self.reactor = R
        self.calls: list[str] = []

    def doRead(self) -> Any:
        if self.raises:
            raise self.result
        return self.result

    def fileno(self) -> int:
        return -1

    def stopReading(self) -> None:
        self.calls.append("stopReading")

    def stopWriting(self) -> None:
        self.calls.append("stopWriting")

    def connectionLost(self, reason: Failure) -> None:
        self.calls.append(f"connectionLost:{reason.type.__name__}")


@implementer(IHalfCloseableProtocol)
class _HalfCloseable(_Transport):
    def readConnectionLost(self, reason: Failure) -> None:
        self.calls.append("readConnectionLost")


class DispatchTests(unittest.SynchronousTestCase):
    def test_a_clean_end_of_stream_stops_reading_and_is_a_read_close(self) -> None:
        """doRead returning ConnectionDone stops reading, then ends the read side of a half-closeable transport."""
        from twisted.internet.interfaces import IHalfCloseableDescriptor

        transport = _HalfCloseable(error.ConnectionDone())
        from zope.interface import directlyProvides

        directlyProvides(transport, IHalfCloseableDescriptor)
        _Readiness(transport, -1).doRead()  # type: ignore[arg-type]
        self.assertEqual(transport.calls, ["stopReading", "readConnectionLost"])

    def test_a_lost_connection_stops_reading_and_ends_it(self) -> None:
        """doRead returning ConnectionLost stops reading and ends the connection with that reason."""
        transport = _Transport(error.ConnectionLost())
        _Readiness(transport, -1).doRead()  # type: ignore[arg-type]
        self.assertEqual(transport.calls, ["stopReading", "connectionLost:ConnectionLost"])

    def test_an_exception_is_logged_and_ends_the_connection(self) -> None:
        """An exception from doRead is logged, as the reactor logs it, and ends the connection with it."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        transport = _Transport(ZeroDivisionError("boom"), raises=True)
        _Readiness(transport, -1).doRead()  # type: ignore[arg-type]
        self.assertEqual(transport.calls, ["stopReading", "connectionLost:ZeroDivisionError"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_nothing_to_report_changes_nothing(self) -> None:
        """doRead returning None (bytes delivered) leaves the transport as it is."""
        transport = _Transport(None)
        _Readiness(transport, -1).doRead()  # type: ignore[arg-type]
        self.assertEqual(transport.calls, [])


def _refused_socket(case: unittest.TestCase) -> socket.socket:
    """A socket whose connect was refused, its error (ECONNREFUSED) pending: as a reset leaves one."""
    unused = socket.socket()
    case.addCleanup(unused.close)
    unused.bind(("127.0.0.1", 0))  # bound, not listening: a connect to it is refused
    sock = socket.socket()
    case.addCleanup(sock.close)
    sock.setblocking(False)
    sock.connect_ex(unused.getsockname())
    select.select([], [sock], [], 5)
    return sock


class _Poller:
    def __init__(self) -> None:
        self.updated: list[bool] = []

    def update(self, end: _Readiness) -> None:
        self.updated.append(end.errors)


class ErrorWhileNotReadTests(unittest.SynchronousTestCase):
    """An error or a hang-up reported while a polled transport is neither read nor written."""

    def readiness(self, sock: socket.socket, disconnecting: bool) -> tuple[_Transport, _Readiness, _Poller]:
        transport = _Transport(None)
        transport.socket = sock  # type: ignore[attr-defined]
        transport.disconnecting = disconnecting  # type: ignore[attr-defined]
        transport._poller = poller = _Poller()  # type: ignore[attr-defined]
        return transport, _Readiness(transport, sock.fileno()), poller  # type: ignore[arg-type]

    def test_an_error_ends_the_connection_even_while_it_is_disconnecting(self) -> None:
        """
        A reset found while a loseConnection is under way ends it too: left
        registered for errors alone, it would be reported at every poll.
        """
        for disconnecting in (False, True):
            transport, readiness, poller = self.readiness(_refused_socket(self), disconnecting)
            readiness.doError()
            self.assertEqual(transport.calls, ["stopReading", "connectionLost:ConnectionLost"], disconnecting)
            self.assertEqual(poller.updated, [])

    def test_a_hang_up_without_an_error_stops_the_errors_interest(self) -> None:
        """Both ways shut with no error: not an end of the connection, and no longer polled for errors alone."""
        for disconnecting in (False, True):
            ours, theirs = socket.socketpair()
            self.addCleanup(ours.close)
            self.addCleanup(theirs.close)
            ours.shutdown(socket.SHUT_WR)
            theirs.shutdown(socket.SHUT_WR)
            transport, readiness, poller = self.readiness(ours, disconnecting)
            readiness.doError()
            self.assertEqual(transport.calls, [], disconnecting)
            self.assertEqual(poller.updated, [False])


class SocketTests(unittest.TestCase):
    if not sys.platform.startswith("linux"):
        skip = "the splice poller is Linux only"

    async def test_a_polled_transport_reads_writes_and_closes_through_the_poller(self) -> None:
        """A PolledServer over a real socket pair delivers bytes, writes, and closes, never in the reactor."""
        a, b = socket.socketpair()
        self.addCleanup(b.close)
        received: list[bytes] = []
        lost: list[Failure] = []

        class Collect(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)
                self.transport.write(data.upper())  # type: ignore[union-attr]

            def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
                lost.append(reason)

        proto = Collect()
        transport = PolledServer(a, proto, ("127.0.0.1", 1), None, 0, R)
        proto.makeConnection(transport)
        self.assertNotIn(transport.fileno(), _reactor_fds())
        b.sendall(b"abc")
        await until(lambda: received == [b"abc"])
        b.settimeout(5)
        self.assertEqual(b.recv(10), b"ABC")
        transport.loseConnection()
        await until(lambda: bool(lost))
        self.assertTrue(lost[0].check(error.ConnectionDone))
        self.assertEqual(b.recv(10), b"")

    async def test_an_exception_from_the_protocols_connection_lost_is_logged(self) -> None:
        """A protocol's connectionLost raising at the peer's close is logged once, as the reactor logs it."""
        a, b = socket.socketpair()
        ended: list[Failure] = []

        class Raising(Protocol):
            def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
                ended.append(reason)
                raise ZeroDivisionError("from connectionLost")

        proto = Raising()
        transport = PolledServer(a, proto, ("127.0.0.1", 1), None, 0, R)
        proto.makeConnection(transport)
        b.close()
        await until(lambda: bool(ended))
        await until(lambda: bool(transport.disconnected))
        self.assertEqual(len(ended), 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
