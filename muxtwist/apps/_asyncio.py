"""
asyncio protocols on Twisted transports: :class:`AsyncioProtocol`, the rule
target that serves any ``asyncio.Protocol`` factory (what
``loop.create_server`` takes), and the adapter under it, shared with
:class:`~muxtwist.apps.ASGI`: an ``asyncio.Transport`` whose calls go to the
Twisted transport, and a Twisted protocol whose events become the asyncio
protocol's calls, flow control included.

A protocol that never touches the event loop runs under any reactor; one
that does (streams, tasks, timers) needs Twisted's asyncio reactor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IPushProducer,
    ISSLTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from muxtwist._options import shown
from muxtwist._transports import abort, can_half_close
from muxtwist._twisted import asyncio_loop_of, write_now
from muxtwist.interfaces import ConnectionInfo, IConnectionInfoFactory

__all__ = ["AsyncioProtocol", "AsyncioProtocolFactory", "AsyncioReactorRequired", "Bridge", "asyncio_loop"]

log = Logger(namespace="muxtwist.apps")

AsyncioProtocolFactory = Callable[[], asyncio.BaseProtocol]


class AsyncioReactorRequired(RuntimeError):
    """A target that runs asyncio code was started under another reactor."""


def asyncio_loop(reactor: object, what: str) -> asyncio.AbstractEventLoop:
    """
    The asyncio event loop a Twisted asyncio reactor runs on, or
    :class:`AsyncioReactorRequired` naming ``what`` needs it.
    """
    loop = asyncio_loop_of(reactor)
    if loop is None:
        raise AsyncioReactorRequired(
            f"{what} needs Twisted's asyncio reactor, but the running reactor is "
            f"{type(reactor).__module__}.{type(reactor).__qualname__}: run "
            "'twistd --reactor=asyncio muxtwist ...', or install "
            "twisted.internet.asyncioreactor before anything imports twisted.internet.reactor "
            "(muxtwist.aio.serve does this inside asyncio.run)"
        )
    return loop


def _loop_running() -> bool:
    """Whether an asyncio event loop is running this code (Twisted's asyncio reactor runs its callbacks in one)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _address(address: IAddress | None) -> Any:
    """An asyncio-style address: ``(host, port)`` for IP, the path for UNIX, ``None`` otherwise."""
    host = getattr(address, "host", None)
    if isinstance(host, str):
        return (host, getattr(address, "port", 0))
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        return name.decode("utf-8", "surrogateescape")
    return name


class _Transport(asyncio.Transport):
    """
    What an asyncio protocol sees: an ``asyncio.Transport`` whose calls go to
    the Twisted transport of the connection.

    Differences from asyncio's own: ``get_write_buffer_size`` is not known
    (Twisted keeps the buffer) and reads as 0; the write buffer limits are
    Twisted's (its transports pause their producer past 64 KiB); inside
    ``TerminateTLS``, ``ssl_object`` is the pyOpenSSL ``Connection`` and
    ``sslcontext`` its ``Context``.
    """

    def __init__(self, bridge: Bridge, transport: ITransport, info: ConnectionInfo | None) -> None:
        super().__init__()
        self._bridge = bridge
        self._twisted = transport
        self._info = info
        self._closing = False
        self._reading = True
        self._limits = (16384, 65536)

    def __repr__(self) -> str:
        return f"<muxtwist.apps transport peer={self.get_extra_info('peername')!r}>"

    # BaseTransport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        transport = self._twisted
        info = self._info
        if name == "peername":
            peer = info.source if info is not None and info.source is not None else transport.getPeer()
            return _address(peer)
        if name == "sockname":
            return _address(info.local if info is not None and info.local is not None else transport.getHost())
        if name in ("ssl_object", "sslcontext", "peercert"):
            if not ISSLTransport.providedBy(transport):
                return default
            connection = transport.getHandle()  # type: ignore[attr-defined]
            if name == "ssl_object":
                return connection
            if name == "sslcontext":
                return connection.get_context()
            return info.peer_certificate if info is not None else default
        if name == "twisted_transport":
            return transport
        return default

    def is_closing(self) -> bool:
        return self._closing or self._bridge.lost

    def close(self) -> None:
        if self.is_closing():
            return
        self._closing = True
        self._bridge.closed = True
        self._bridge.release()
        self._twisted.loseConnection()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._bridge.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        # None once the connection is lost, as with asyncio's transports.
        return self._bridge.protocol  # type: ignore[return-value]

    # ReadTransport

    def is_reading(self) -> bool:
        return self._reading and not self.is_closing()

    def pause_reading(self) -> None:
        if self._reading and not self.is_closing():
            self._reading = False
            self._twisted.pauseProducing()  # type: ignore[attr-defined]

    def resume_reading(self) -> None:
        if not self._reading and not self.is_closing():
            self._reading = True
            self._twisted.resumeProducing()  # type: ignore[attr-defined]

    # WriteTransport

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        high = 65536 if high is None else high
        low = high // 4 if low is None else low
        if not high >= low >= 0:
            raise ValueError(f"high ({shown(high)}) must be >= low ({shown(low)}) must be >= 0")
        self._limits = (low, high)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._limits

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__}")
        if self.is_closing() or not data:
            return
        write_now(self._twisted, bytes(data))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        if self.is_closing():
            return
        self._twisted.writeSequence([bytes(d) for d in list_of_data])

    def write_eof(self) -> None:
        if not self.can_write_eof():
            raise NotImplementedError("this transport cannot half-close")
        if not self.is_closing():
            self._bridge.release()
            self._twisted.loseWriteConnection()  # type: ignore[attr-defined]

    def can_write_eof(self) -> bool:
        # Not inside TLS: the TCP transport's FIN would cut the TLS stream (asyncio's TLS transports say False too).
        return can_half_close(self._twisted)

    def abort(self) -> None:
        self._closing = True
        self._bridge.closed = self._bridge.aborted = True
        abort(self._twisted)


@implementer(IHalfCloseableProtocol, IPushProducer)
class Bridge(Protocol):
    """
    The Twisted protocol of a connection served by an asyncio protocol: Twisted
    events become asyncio protocol calls, and the Twisted transport's
    producer/consumer flow control becomes ``pause_writing``/``resume_writing``.

    With ``ready`` (a list the owning target fills with a callback slot), the
    asyncio protocol is built only once the target is ready (an ASGI app's
    lifespan startup), reading paused and data kept until then.
    """

    def __init__(self, build: AsyncioProtocolFactory, info: ConnectionInfo | None) -> None:
        self._build = build
        self._info = info
        self.protocol: asyncio.BaseProtocol | None = None
        self.lost = False
        self.aborted = False
        # close() or abort() was called: as asyncio's transports stop
        # reading then, nothing more reaches the protocol but
        # connection_lost (a TLS layer reads on until close_notify comes).
        self.closed = False
        self._producing = False
        self._paused_writing = False
        self._waiting: list[bytes] | None = None
        self._eof_waiting = False

    # Twisted side

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self._producing = True
        # As asyncio's own TCP transports: no Nagle delay. asyncio protocols
        # (uvicorn's among them) write an answer's head and body separately.
        no_delay = getattr(transport, "setTcpNoDelay", None)
        if no_delay is not None:
            try:
                no_delay(True)
            except OSError:
                pass

    def release(self) -> None:
        """
        Nothing more will be written: stop being the transport's producer.
        A Twisted transport with a producer registered, paused or not, never
        closes or half-closes (it asks the producer for more instead), so a
        ``close()`` or ``write_eof()`` made while writing was paused would
        hold the connection open for ever.
        """
        if self._producing and self.transport is not None:
            self._producing = False
            self.transport.unregisterProducer()  # type: ignore[attr-defined]

    def wait(self) -> None:
        """Hold data until :meth:`start` (the target is not ready yet)."""
        self._waiting = []
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def start(self) -> None:
        """Build the asyncio protocol and give it the connection and any data held."""
        transport = self.transport
        assert transport is not None
        waiting, self._waiting = self._waiting, None
        try:
            proto = self._build()
        except Exception:
            log.failure("asyncio protocol factory raised")
            transport.loseConnection()
            return
        if isinstance(proto, asyncio.StreamReaderProtocol) and not _loop_running():
            # Its callback is a task on a loop nothing runs: the connection
            # would hang, silently, until the client gives up.
            log.error(
                "{factory} built an asyncio.StreamReaderProtocol, which needs Twisted's asyncio reactor "
                "(twistd --reactor=asyncio muxtwist ...): closing {peer}",
                factory=repr(self.factory),
                peer=transport.getPeer(),
            )
            transport.loseConnection()
            return
        self.protocol = proto
        self.asyncio_transport = _Transport(self, transport, self._info)
        proto.connection_made(self.asyncio_transport)
        if waiting is not None:
            transport.resumeProducing()  # type: ignore[attr-defined]
            for chunk in waiting:
                if self.lost or self.closed:
                    return
                self._deliver(chunk)
            if self._eof_waiting and not self.lost:
                self.readConnectionLost()

    def refuse(self) -> None:
        """The target cannot serve (its startup failed): close the connection."""
        self._waiting = None
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._waiting is not None:
            self._waiting.append(data)
            return
        if self.protocol is not None and not self.closed:
            self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        proto = self.protocol
        if isinstance(proto, asyncio.BufferedProtocol):
            view = memoryview(data)
            while view:
                buffer = memoryview(proto.get_buffer(len(view)))
                n = min(len(buffer), len(view))
                if n == 0:
                    raise RuntimeError("get_buffer() returned an empty buffer")
                buffer[:n] = view[:n]
                view = view[n:]
                proto.buffer_updated(n)
        elif isinstance(proto, asyncio.Protocol):
            proto.data_received(data)

    def readConnectionLost(self) -> None:
        if self._waiting is not None:
            self._eof_waiting = True
            return
        if self.closed:
            return
        proto = self.protocol
        keep_open = proto.eof_received() if isinstance(proto, asyncio.Protocol | asyncio.BufferedProtocol) else None
        if not keep_open and self.transport is not None:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self._waiting = None
        proto = self.protocol
        if proto is None:
            return
        # asyncio calls connection_lost(None) after its own abort() too.
        exc = None if self.aborted or isinstance(reason.value, ConnectionDone) else reason.value
        try:
            proto.connection_lost(exc if isinstance(exc, Exception) or exc is None else ConnectionError(str(exc)))
        finally:
            # Break the protocol <-> transport cycles, as asyncio's transports
            # do once connection_lost has run: they would otherwise keep the
            # Twisted transport, and any data it still held, until the cycle
            # collector runs (an aborted 20 MB write stayed in memory).
            self.protocol = None
            self.__dict__.pop("asyncio_transport", None)

    # IPushProducer: the transport says its write buffer is full or drained.

    def pauseProducing(self) -> None:
        if not self._paused_writing and self.protocol is not None:
            self._paused_writing = True
            self.protocol.pause_writing()

    def resumeProducing(self) -> None:
        if self._paused_writing and self.protocol is not None:
            self._paused_writing = False
            self.protocol.resume_writing()

    def stopProducing(self) -> None:
        pass


@implementer(IConnectionInfoFactory)
class AsyncioProtocol(Factory):
    """
    A rule target that serves each connection with an ``asyncio.Protocol``
    (or ``BufferedProtocol``) from ``factory``, what ``loop.create_server``
    takes. The sniffed bytes reach ``data_received`` first; ``eof_received``
    is called on the client's half-close, and ``write_eof`` half-closes.

    A protocol that does not touch the event loop works under any reactor;
    one that does (``asyncio.StreamReaderProtocol``, tasks, ``call_later``)
    needs Twisted's asyncio reactor, which is running the loop it will find.
    """

    def __init__(self, factory: AsyncioProtocolFactory) -> None:
        if not callable(factory):
            raise TypeError(f"AsyncioProtocol needs a callable returning an asyncio protocol, got {shown(factory)}")
        self.factory = factory

    def __repr__(self) -> str:
        return f"AsyncioProtocol({getattr(self.factory, '__qualname__', self.factory)!r})"

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self.buildProtocolForConnection(addr, None, "")

    def buildProtocolForConnection(
        self, addr: IAddress | None, info: ConnectionInfo | None, rule_name: str
    ) -> Protocol:
        bridge = _StartingBridge(self.factory, info)
        bridge.factory = self
        return bridge


class _StartingBridge(Bridge):
    """A bridge that builds its asyncio protocol as soon as it is connected."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.start()
