"""
The private Twisted attributes muxtwist reads (muxtwist._twisted), checked on
real Twisted objects: a Twisted release that renames or changes one fails
here, naming the helper, rather than somewhere in the relays.
"""

from __future__ import annotations

import ast
import asyncio
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, endpoints, protocol, reactor, task, tcp
from twisted.internet import unix as unix_sockets
from twisted.internet.asyncioreactor import AsyncioSelectorReactor
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial import unittest

import muxtwist
from muxtwist._twisted import (
    after_connection_lost,
    asyncio_loop_of,
    default_reactor,
    endpoint_backlog,
    endpoint_port,
    endpoint_unix_path,
    generic_http_channel_base,
    http_channel_busy,
    http_head_coming,
    http_inner_channel,
    listen_errors_raise,
    listening,
    reactor_started,
    remove_twistd_pidfile,
    set_port_log_observer,
    take_exit_signal,
    tell_twistd_parent,
    tls_unsent_bytes,
    unsent_bytes,
    was_aborted,
    write_now,
)


class _Pair(unittest.TestCase):
    """A real TCP connection on loopback: ``self.client`` is our side's transport."""

    async def connect(self) -> tcp.Connection:
        server = protocol.ServerFactory.forProtocol(protocol.Protocol)
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        made: defer.Deferred[protocol.Protocol] = defer.Deferred()

        class Client(protocol.Protocol):
            def connectionMade(self) -> None:
                made.callback(self)

        creator = protocol.ClientCreator(reactor, Client)
        await creator.connectTCP("127.0.0.1", port.getHost().port)
        client = await made
        transport = client.transport
        assert isinstance(transport, tcp.Connection)
        self.addCleanup(transport.abortConnection)
        return transport


class UnsentBytesTests(_Pair):
    async def test_counts_what_a_tcp_transport_holds(self) -> None:
        """unsent_bytes: a TCP transport's dataBuffer, offset and _tempDataLen add up to the bytes not yet sent."""
        transport = await self.connect()
        self.assertEqual(unsent_bytes(transport), 0)
        # Writes go to _tempDataBuffer until the reactor's next doWrite.
        transport.write(b"x" * 1000)
        transport.writeSequence([b"y" * 10, b"z" * 5])
        self.assertEqual(unsent_bytes(transport), 1015, "FileDescriptor._tempDataLen changed meaning")
        # After doWrite, they move to dataBuffer; what the socket took is past offset.
        transport.doWrite()
        self.assertEqual(unsent_bytes(transport), 0, "FileDescriptor.dataBuffer/offset changed meaning")
        self.assertIsInstance(transport.dataBuffer, bytes)
        self.assertIsInstance(transport.offset, int)

    async def test_counts_a_partly_sent_buffer(self) -> None:
        """unsent_bytes: when the socket takes part of a buffer, the rest is counted through offset."""
        transport = await self.connect()
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport.stopReading()  # the peer reads nothing: its window fills
        size = 8 * 1024 * 1024
        transport.write(b"x" * size)
        transport.doWrite()
        left = unsent_bytes(transport)
        assert left is not None
        self.assertTrue(0 < left < size, left)
        self.assertEqual(left, len(transport.dataBuffer) - transport.offset + transport._tempDataLen)
        self.assertGreater(transport.offset, 0, "FileDescriptor.offset no longer marks what was sent")

    def test_none_for_other_transports(self) -> None:
        """unsent_bytes is None for a transport that is not a FileDescriptor."""
        self.assertIsNone(unsent_bytes(StringTransport()))
        self.assertIsNone(unsent_bytes(None))


class _Collect(protocol.Protocol):
    def __init__(self, done: defer.Deferred[bytes]) -> None:
        self.done = done
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.done.callback(b"".join(self.chunks))


class _NoSocket:
    """A transport whose socket must not be touched; records what write() got."""

    connected = True
    disconnecting = False
    dataBuffer = b""
    offset = 0
    _tempDataLen = 0

    def __init__(self, tls: object) -> None:
        if tls is not None:
            self.TLS = tls
        self.written: list[bytes] = []

    @property
    def socket(self) -> Any:
        raise AssertionError("write_now sent to the socket under a TLS layer")

    def write(self, data: bytes) -> None:
        self.written.append(data)


class WriteNowTests(_Pair):
    async def collecting_pair(self) -> tuple[tcp.Connection, defer.Deferred[bytes]]:
        done: defer.Deferred[bytes] = defer.Deferred()
        server = protocol.ServerFactory.forProtocol(lambda: _Collect(done))
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = await protocol.ClientCreator(reactor, protocol.Protocol).connectTCP("127.0.0.1", port.getHost().port)
        transport = client.transport
        assert isinstance(transport, tcp.Connection)
        self.addCleanup(transport.abortConnection)
        return transport, done

    async def test_idle_tcp_transport_sends_at_once(self) -> None:
        """write_now on a TCP transport with nothing queued: the socket takes the bytes, nothing waits for a doWrite."""
        transport, done = await self.collecting_pair()
        write_now(transport, b"hello")
        self.assertEqual(unsent_bytes(transport), 0)
        self.assertNotIn(transport, reactor.getWriters())
        transport.loseConnection()
        self.assertEqual(await done, b"hello")

    async def test_rest_and_later_writes_follow_in_order(self) -> None:
        """What the socket does not take is queued; later writes go behind it; the peer gets every byte in order."""
        transport, done = await self.collecting_pair()
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        first = bytes(range(256)) * 16384  # 4 MiB, more than the socket takes at once
        write_now(transport, first)
        held = unsent_bytes(transport)
        assert held is not None
        self.assertTrue(0 < held < len(first), held)
        write_now(transport, b"tail")
        self.assertEqual(unsent_bytes(transport), held + 4)
        transport.loseConnection()
        self.assertEqual(await done, first + b"tail")

    def test_never_under_tls(self) -> None:
        """Under TLS (startTLS's flag, or a wrapper forwarding the TCP transport's attributes) write() is used."""
        for flag in (None, True):
            transport = _NoSocket(flag)
            write_now(transport, b"secret")
            self.assertEqual(transport.written, [b"secret"])
        self.assertIs(tcp.Server.TLS, False, "Twisted's TCP connections no longer say TLS = False")

        class Wrapper:
            """Forwards what it lacks to the TCP transport under it, as ProtocolWrapper does."""

            def __init__(self, below: object) -> None:
                self.below = below
                self.written: list[bytes] = []

            def __getattr__(self, name: str) -> Any:
                return getattr(self.below, name)

            def write(self, data: bytes) -> None:
                self.written.append(data)

        wrapper = Wrapper(_NoSocket(False))
        write_now(wrapper, b"secret")
        self.assertEqual(wrapper.written, [b"secret"])
        self.assertFalse(hasattr(TLSMemoryBIOProtocol, "TLS"), "TLSMemoryBIOProtocol has a TLS flag of its own now")


class TLSUnsentBytesTests(unittest.TestCase):
    def _client(self, kind: type[TLSMemoryBIOProtocol] | None = None) -> TLSMemoryBIOProtocol:
        """A client TLS transport that has sent its ClientHello and waits for an answer that never comes."""
        from twisted.internet.ssl import optionsForClientTLS

        factory = TLSMemoryBIOFactory(
            optionsForClientTLS("example.com"), True, protocol.Factory.forProtocol(protocol.Protocol)
        )
        tls = factory.buildProtocol(None) if kind is None else kind(factory, protocol.Protocol())
        tls.makeConnection(StringTransport())
        return tls

    def test_counts_writes_held_during_the_handshake(self) -> None:
        """tls_unsent_bytes: writes made before the handshake completes wait in _appSendBuffer, all counted."""
        tls = self._client(TLSMemoryBIOProtocol)
        self.assertEqual(tls_unsent_bytes(tls), 0)
        tls.write(b"x" * 100)
        tls.writeSequence([b"y" * 10, b"z" * 5])
        self.assertIsInstance(tls._appSendBuffer, list, "TLSMemoryBIOProtocol._appSendBuffer is no longer a list")
        self.assertEqual(tls_unsent_bytes(tls), 115, "TLSMemoryBIOProtocol._appSendBuffer changed meaning")

    def test_counts_what_the_buffering_transport_passed_on(self) -> None:
        """tls_unsent_bytes: the factory's own (write-aggregating) TLS transport holds a large write there too."""
        tls = self._client()
        tls.write(b"x" * 70000)
        self.assertEqual(tls_unsent_bytes(tls), 70000)

    def test_none_for_other_transports(self) -> None:
        """tls_unsent_bytes is None for a transport that is not TLS, and for none at all."""
        self.assertIsNone(tls_unsent_bytes(StringTransport()))
        self.assertIsNone(tls_unsent_bytes(None))


class AbortedTests(unittest.TestCase):
    def test_tls_transport_records_abort(self) -> None:
        """was_aborted: TLSMemoryBIOProtocol sets _aborted when abortConnection is called."""
        from twisted.internet.ssl import optionsForClientTLS

        factory = TLSMemoryBIOFactory(
            optionsForClientTLS("example.com"), True, protocol.Factory.forProtocol(protocol.Protocol)
        )
        tls = factory.buildProtocol(None)
        tls.makeConnection(StringTransport())
        self.assertFalse(was_aborted(tls))
        self.assertTrue(hasattr(type(tls), "_aborted"), "TLSMemoryBIOProtocol._aborted is gone")
        tls.abortConnection()
        self.assertTrue(was_aborted(tls), "TLSMemoryBIOProtocol.abortConnection no longer sets _aborted")

    def test_false_elsewhere(self) -> None:
        """was_aborted is False for a transport that does not record aborts."""
        self.assertFalse(was_aborted(StringTransport()))


class ListeningServiceTests(unittest.TestCase):
    def test_raise_synchronously(self) -> None:
        """listen_errors_raise: privilegedStartService raises a failed listen instead of logging it."""
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        endpoint = endpoints.TCP4ServerEndpoint(reactor, busy.getsockname()[1], interface="127.0.0.1")
        service = StreamServerEndpointService(endpoint, protocol.Factory())
        self.assertFalse(service._raiseSynchronously)
        listen_errors_raise(service)
        self.assertRaises(CannotListenError, service.privilegedStartService)

    def test_waiting_for_port(self) -> None:
        """listening: None before start, then the Deferred that fires with the listening port."""
        memory = MemoryReactorClock()
        endpoint = endpoints.TCP4ServerEndpoint(memory, 0, interface="127.0.0.1")
        service = StreamServerEndpointService(endpoint, protocol.Factory())
        self.assertIsNone(listening(service), "StreamServerEndpointService._waitingForPort is not None at first")
        service.privilegedStartService()
        waiting = listening(service)
        self.assertIsInstance(waiting, defer.Deferred)
        assert waiting is not None
        self.successResultOf(waiting)
        self.assertEqual([(port, interface) for port, _, _, interface in memory.tcpServers], [(0, "127.0.0.1")])


class ReactorTests(unittest.TestCase):
    def test_asyncio_loop(self) -> None:
        """asyncio_loop_of: an AsyncioSelectorReactor keeps the loop it was built on as _asyncioEventloop."""
        loop = asyncio.new_event_loop()
        self.addCleanup(loop.close)
        asyncio_reactor = AsyncioSelectorReactor(loop)
        self.assertIs(asyncio_loop_of(asyncio_reactor), loop)
        self.assertIsNone(asyncio_loop_of(Clock()))

    def test_started(self) -> None:
        """reactor_started: ReactorBase._started turns true on startRunning, before the loop runs."""
        loop = asyncio.new_event_loop()
        self.addCleanup(loop.close)
        asyncio_reactor = AsyncioSelectorReactor(loop)
        self.assertFalse(reactor_started(asyncio_reactor))
        asyncio_reactor.startRunning(installSignalHandlers=False)
        self.assertTrue(reactor_started(asyncio_reactor), "ReactorBase._started is not set by startRunning")
        asyncio_reactor.stop()
        asyncio_reactor.crash()

    def test_exit_signal(self) -> None:
        """take_exit_signal: the reactor's SIGTERM handler notes the signal as _exitSignal; twistd reads it at exit."""
        import inspect
        import signal

        from twisted.application import app

        loop = asyncio.new_event_loop()
        self.addCleanup(loop.close)
        asyncio_reactor = AsyncioSelectorReactor(loop)
        self.assertIsNone(take_exit_signal(asyncio_reactor))
        asyncio_reactor.sigTerm(signal.SIGTERM)
        self.assertEqual(take_exit_signal(asyncio_reactor), signal.SIGTERM)
        self.assertIsNone(take_exit_signal(asyncio_reactor))
        self.assertIn("reactor._exitSignal", inspect.getsource(app.ApplicationRunner))
        self.assertIsNone(take_exit_signal(Clock()))

    def test_endpoint_port(self) -> None:
        """endpoint_port: serverFromString's TCP endpoints keep _port and _interface as parsed."""

        class NoReactor:
            pass

        tcp4 = endpoints.serverFromString(NoReactor(), "tcp:8443:interface=127.0.0.1")
        tcp6 = endpoints.serverFromString(NoReactor(), "tcp6:8444:interface=\\:\\:1")
        self.assertEqual(endpoint_port(tcp4), (8443, "127.0.0.1"))
        self.assertEqual(endpoint_port(tcp6), (8444, "::1"))
        self.assertIsNone(endpoint_port(endpoints.serverFromString(NoReactor(), "unix:/tmp/x.sock")))

    def test_endpoint_unix_path(self) -> None:
        """endpoint_unix_path: serverFromString's UNIX endpoint keeps its path as _address."""

        class NoReactor:
            pass

        path = endpoint_unix_path(endpoints.serverFromString(NoReactor(), "unix:/tmp/x.sock:mode=600"))
        self.assertEqual(path, "/tmp/x.sock")
        self.assertIsNone(endpoint_unix_path(endpoints.serverFromString(NoReactor(), "tcp:8443")))

    def test_endpoint_backlog(self) -> None:
        """endpoint_backlog: serverFromString's stream endpoints keep backlog= (50 by default) as _backlog."""

        class NoReactor:
            pass

        self.assertEqual(endpoint_backlog(endpoints.serverFromString(NoReactor(), "tcp:8443:backlog=7")), 7)
        self.assertEqual(endpoint_backlog(endpoints.serverFromString(NoReactor(), "tcp6:8444")), 50)
        self.assertEqual(endpoint_backlog(endpoints.serverFromString(NoReactor(), "unix:/tmp/x.sock:backlog=3")), 3)
        self.assertIsNone(endpoint_backlog(object()))

    def test_default_reactor(self) -> None:
        """default_reactor gives back the reactor passed, and the global one for None."""
        clock = Clock()
        self.assertIs(default_reactor(clock), clock)
        self.assertIs(default_reactor(None), reactor)


class PortLoggerTests(unittest.TestCase):
    """``set_port_log_observer``: a listening TCP port's private ``_logger``."""

    def test_port_events_reach_the_given_observer(self) -> None:
        """A real listening port's log events, as doRead's buffering logger emits them, go to our observer."""
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertIsInstance(tcp.Port.__dict__.get("_logger"), Logger, "tcp.Port._logger is gone: see _twisted.py")
        seen: list[dict[str, object]] = []
        self.assertTrue(set_port_log_observer(port, seen.append))
        logger = port._logger  # type: ignore[attr-defined]
        logger.info("EMFILE recovery: Closed socket from {address}", address="x")
        self.assertEqual([e["log_format"] for e in seen], ["EMFILE recovery: Closed socket from {address}"])
        self.assertIs(seen[0]["log_source"], port)

    def test_objects_without_a_logger_are_left_alone(self) -> None:
        """Anything that is not a Twisted TCP port is refused, not patched."""
        self.assertFalse(set_port_log_observer(object(), print))


class _Ends:
    """A watcher for after_connection_lost: the winners it is told of, and what their protocols had seen by then."""

    def __init__(self, name: str = "", order: list[str] | None = None) -> None:
        self.name = name
        self.order = order if order is not None else []
        self.told: list[tuple[object, bool]] = []

    def _ended(self, winner: object) -> None:
        self.told.append((winner, bool(getattr(winner, "lost", False))))
        self.order.append(self.name)


class _Server(protocol.Protocol):
    def __init__(self, made: defer.Deferred[_Server]) -> None:
        self.made = made
        self.lost = False
        self.gone: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = True
        self.gone.callback(None)


class AfterConnectionLostTests(unittest.TestCase):
    """``after_connection_lost``: Twisted calls a transport's connectionLost through the instance."""

    LOUD = (
        "Twisted ended the transport without calling the connectionLost set on its instance: "
        "after_connection_lost in muxtwist/_twisted.py no longer learns of ends (handed-off connections "
        "would never be reported)"
    )

    async def pair(self, tls: bool = False, unix: bool = False) -> tuple[_Server, protocol.Protocol, Any]:
        """A real loopback connection: our server protocol, the client protocol and the server's transport."""
        made: defer.Deferred[_Server] = defer.Deferred()
        server_factory: Any = protocol.Factory.forProtocol(lambda: _Server(made))
        client_factory: Any = protocol.Factory.forProtocol(protocol.Protocol)
        if tls:
            from twisted.internet import ssl

            from tests.certs import make_certificate

            cert = make_certificate("localhost")
            server_options = ssl.PrivateCertificate.loadPEM(cert.key_pem + cert.cert_pem).options()
            client_options = ssl.optionsForClientTLS("localhost", ssl.Certificate.loadPEM(cert.cert_pem))
            server_factory = TLSMemoryBIOFactory(server_options, False, server_factory)
            client_factory = TLSMemoryBIOFactory(client_options, True, client_factory)
        if unix:
            directory = tempfile.mkdtemp(prefix="mux-")  # short: AF_UNIX paths are limited to 108 bytes
            self.addCleanup(shutil.rmtree, directory)
            path = os.path.join(directory, "s")
            port = reactor.listenUNIX(path, server_factory)
            self.addCleanup(port.stopListening)
            client = await endpoints.UNIXClientEndpoint(reactor, path).connect(client_factory)
        else:
            port = reactor.listenTCP(0, server_factory, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            client = await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
                client_factory
            )
        server = await made
        self.addCleanup(lambda: None if server.lost else server.transport.abortConnection())  # type: ignore[union-attr]
        if tls:
            # The TLS layer is the transport of our protocol, as TerminateTLS's inner sniffer has it.
            self.assertIsInstance(server.transport, TLSMemoryBIOProtocol)
        else:
            self.assertIsInstance(server.transport, unix_sockets.Server if unix else tcp.Server)
        return server, client, server.transport

    async def turn(self) -> None:
        """Back to the reactor: our protocol's connectionLost fires its Deferred before the transport's returns."""
        await task.deferLater(reactor, 0, lambda: None)

    async def check_end(self, end: Any, tls: bool = False, unix: bool = False) -> None:
        server, client, transport = await self.pair(tls, unix)
        ends = _Ends()
        self.assertTrue(after_connection_lost(transport, ends, server))
        self.assertIn("connectionLost", vars(transport))
        end(server, client, transport)
        await server.gone
        await self.turn()
        self.assertEqual(ends.told, [(server, True)], self.LOUD)
        self.assertNotIn("connectionLost", vars(transport), "the transport keeps the hook after its end")

    async def test_peer_close(self) -> None:
        """The reactor ends a TCP server transport whose peer closed through its instance connectionLost."""
        await self.check_end(lambda server, client, transport: client.transport.loseConnection())

    async def test_lose_connection(self) -> None:
        """loseConnection on a TCP server transport ends it through its instance connectionLost."""
        await self.check_end(lambda server, client, transport: transport.loseConnection())

    async def test_abort_connection(self) -> None:
        """abortConnection on a TCP server transport ends it through its instance connectionLost."""
        await self.check_end(lambda server, client, transport: transport.abortConnection())

    async def test_tls_peer_close(self) -> None:
        """A TLSMemoryBIOProtocol whose peer closed is ended through its instance connectionLost."""
        await self.check_end(lambda server, client, transport: client.transport.loseConnection(), tls=True)

    async def test_tls_abort(self) -> None:
        """abortConnection on a TLSMemoryBIOProtocol ends it through its instance connectionLost."""
        await self.check_end(lambda server, client, transport: transport.abortConnection(), tls=True)

    async def test_unix_peer_close(self) -> None:
        """The reactor ends a UNIX server transport whose peer closed through its instance connectionLost."""
        await self.check_end(lambda server, client, transport: client.transport.loseConnection(), unix=True)

    async def test_nested_watchers_innermost_first(self) -> None:
        """Two watchers of one transport are each told once, the one set last first."""
        server, client, transport = await self.pair()
        order: list[str] = []
        outer, inner = _Ends("outer", order), _Ends("inner", order)
        self.assertTrue(after_connection_lost(transport, outer, "the inner sniffer"))
        self.assertTrue(after_connection_lost(transport, inner, server))
        client.transport.loseConnection()  # type: ignore[union-attr]
        await server.gone
        await self.turn()
        self.assertEqual(order, ["inner", "outer"], self.LOUD)
        self.assertEqual(inner.told, [(server, True)])
        self.assertEqual(outer.told, [("the inner sniffer", False)])

    def test_refused_transports(self) -> None:
        """Transports without a connectionLost of their own, or without room for the attribute, are refused."""

        class Slotted:
            __slots__ = ("protocol",)

            def connectionLost(self, reason: Failure) -> None:
                pass

        for transport in (StringTransport(), Slotted()):
            self.assertFalse(after_connection_lost(transport, _Ends(), None), transport)
            self.assertNotIn("connectionLost", getattr(transport, "__dict__", {}))


#: The private attributes of Twisted's objects that muxtwist reads, all in
#: muxtwist/_twisted.py. Read on ``self`` they are muxtwist's own names.
_PRIVATE = frozenset(
    {
        "_GenericHTTPChannelProtocol",
        "_aborted",
        "_appSendBuffer",
        "_channel",
        "_handlingRequest",
        "_asyncioEventloop",
        "_exitSignal",
        "_backlog",
        "_interface",
        "_logger",
        "_port",
        "_raiseSynchronously",
        "_started",
        "_tempDataBuffer",
        "_tempDataLen",
        "_waitingForPort",
        "statusPipe",
        "dataBuffer",
        "offset",
    }
)

_PACKAGE = Path(muxtwist.__file__).resolve().parent


def _sources() -> list[tuple[str, ast.Module]]:
    paths = sorted(_PACKAGE.rglob("*.py"))
    return [(str(p.relative_to(_PACKAGE.parent)), ast.parse(p.read_text(), str(p))) for p in paths]


class HTTPChannelTests(unittest.TestCase):
    """The twisted.web internals the WSGI target's half-close support reads."""

    def test_site_channels_and_their_busy_flag(self) -> None:
        """Site builds generic_http_channel_base()'s kind; its inner HTTPChannel is busy while a request is answered."""
        from twisted.internet.address import IPv4Address
        from twisted.web.http import HTTPChannel
        from twisted.web.resource import Resource
        from twisted.web.server import NOT_DONE_YET, Site

        held: list[Any] = []

        class Slow(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> object:
                held.append(request)
                return NOT_DONE_YET

        site = Site(Slow(), reactor=Clock())
        built = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.assertIsInstance(built, generic_http_channel_base())
        channel = http_inner_channel(built)
        self.assertIsInstance(channel, HTTPChannel)
        built.makeConnection(StringTransport())
        self.assertFalse(http_channel_busy(channel))
        built.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(len(held), 1)
        self.assertTrue(http_channel_busy(channel))
        held[0].write(b"done")
        held[0].finish()
        self.assertFalse(http_channel_busy(channel))

    def test_a_request_head_coming(self) -> None:
        """http_head_coming is true from a head's first byte until its blank line, and between heads false."""
        from twisted.internet.address import IPv4Address
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        class Hello(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                return b"hello"

        built = Site(Hello(), reactor=Clock()).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        channel = http_inner_channel(built)
        built.makeConnection(StringTransport())
        self.assertFalse(http_head_coming(channel))
        for piece in (b"G", b"ET / HTTP/1.1\r\n", b"Host: a\r\n"):
            built.dataReceived(piece)
            self.assertTrue(http_head_coming(channel), piece)
        built.dataReceived(b"\r\n")  # answered at once: between two requests
        self.assertFalse(http_head_coming(channel))
        built.dataReceived(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab")
        self.assertFalse(http_head_coming(channel))  # its body coming, not its head


class TwistdStatusPipeTests(unittest.SynchronousTestCase):
    """tell_twistd_parent writes what a daemonizing twistd's waiting parent reads and prints."""

    def test_a_daemonizing_twistd_keeps_its_status_pipe_in_its_options(self) -> None:
        """UnixApplicationRunner.setupEnvironment keeps the pipe daemonize() gave as options["statusPipe"]."""
        from twisted.scripts import _twistd_unix

        options = _twistd_unix.ServerOptions()
        runner = _twistd_unix.UnixApplicationRunner(options)
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        self.patch(runner, "daemonize", lambda reactor: w)
        umask = os.umask(0o022)
        os.umask(umask)
        runner.setupEnvironment(None, ".", False, umask, None)
        self.assertIs(options["statusPipe"], w)

    def test_the_waiting_parent_prints_the_problem_and_exits_1(self) -> None:
        """What tell_twistd_parent writes, cut to fit, is what the parent prints; it tells once, and only a daemon."""
        import io
        import sys

        from twisted.scripts import _twistd_unix

        options = _twistd_unix.ServerOptions()
        runner = _twistd_unix.UnixApplicationRunner(options)
        r, options["statusPipe"] = os.pipe()
        self.addCleanup(os.close, r)
        self.assertTrue(tell_twistd_parent(options, "cannot start 6 workers: " + "x" * 200))
        self.assertFalse(tell_twistd_parent(options, "again"))
        self.assertFalse(tell_twistd_parent(_twistd_unix.ServerOptions(), "in the foreground"))
        self.assertFalse(tell_twistd_parent(None, "outside twistd"))
        printed = io.StringIO()
        self.patch(sys, "__stderr__", printed)
        self.assertEqual(runner._waitForStart(r), 1)
        self.assertEqual(
            printed.getvalue(),
            f"An error has occurred: b'cannot start 6 workers: {'x' * 71}...'\n"
            "Please look at log file for more information.\n",
        )
        self.assertEqual(os.read(r, 100), b"")  # the write end is closed: nothing more, no wait


class OnePlaceTests(unittest.TestCase):
    """muxtwist/_twisted.py is the one module that reads Twisted's private attributes or imports the reactor."""

    def test_private_attributes_only_in_twisted_helpers(self) -> None:
        """No module but muxtwist/_twisted.py reads one of Twisted's private attributes, by name or through getattr."""
        found = []
        for name, tree in _sources():
            if name == "muxtwist/_twisted.py":
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and node.attr in _PRIVATE:
                    if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                        found.append(f"{name}:{node.lineno}: .{node.attr}")
                elif isinstance(node, ast.Constant) and node.value in _PRIVATE:
                    found.append(f"{name}:{node.lineno}: {node.value!r}")
        self.assertEqual(found, [])

    def test_reactor_imported_only_by_default_reactor(self) -> None:
        """twisted.internet.reactor is imported by default_reactor alone (and by muxtwist.aio, which installs it)."""
        found = []
        for name, tree in _sources():
            if name in ("muxtwist/_twisted.py", "muxtwist/aio.py"):
                continue
            for node in ast.walk(tree):
                imported = (
                    [alias.name for alias in node.names]
                    if isinstance(node, ast.Import)
                    else [f"{node.module}.{alias.name}" for alias in node.names]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                if "twisted.internet.reactor" in imported:
                    found.append(f"{name}:{node.lineno}")
        self.assertEqual(found, [])


class TwistdPidfileTests(unittest.SynchronousTestCase):
    """remove_twistd_pidfile removes the pid file twistd wrote for this process, and no other."""

    def test_the_file_twistd_writes_for_this_process_is_removed_and_no_other(self) -> None:
        """setupEnvironment's pid file (named in twistd's options) goes; one naming another process, or none, stays."""
        from twisted.scripts import _twistd_unix

        folder = self.mktemp()
        os.mkdir(folder)
        path = os.path.join(folder, "twistd.pid")
        options = _twistd_unix.ServerOptions()
        options["pidfile"] = path
        runner = _twistd_unix.UnixApplicationRunner(options)
        umask = os.umask(0o022)
        os.umask(umask)
        runner.setupEnvironment(None, ".", True, umask, path)
        self.assertTrue(os.path.exists(path))
        self.assertTrue(remove_twistd_pidfile(options))
        self.assertFalse(os.path.exists(path))
        self.assertFalse(remove_twistd_pidfile(options))  # gone already
        with open(path, "w") as f:
            f.write(str(os.getpid() + 1))
        self.assertFalse(remove_twistd_pidfile(options))
        self.assertTrue(os.path.exists(path))
        options["pidfile"] = ""
        self.assertFalse(remove_twistd_pidfile(options))  # twistd --pidfile=
        self.assertFalse(remove_twistd_pidfile(None))  # outside twistd
