"""
Rule targets for the Python web stack: ASGI and WSGI applications and
asyncio protocols, served in-process on a sniffed connection.

Each target is an ordinary Twisted ``IProtocolFactory``, so it nests inside
``TerminateTLS`` and a nested ``SniffingFactory`` like any other target.

- :class:`AsyncioProtocol` runs any ``asyncio.Protocol`` factory (what
  ``loop.create_server`` takes) over the Twisted transport, through an
  adapter that behaves like an asyncio transport. A protocol that never
  touches the event loop runs under any reactor; one that does (streams,
  tasks, timers) needs Twisted's asyncio reactor.
- :class:`ASGI` serves an ASGI application with uvicorn's HTTP/1.1 and
  WebSocket protocol classes, driven through that same adapter, and ties the
  application's lifespan to ``doStart``/``doStop``. It needs the asyncio
  reactor (the application is asyncio code).
- :class:`WSGI` serves a WSGI application with ``twisted.web.wsgi`` on a
  bounded thread pool started and stopped with the factory.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from twisted.internet import defer
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
from twisted.python.threadpool import ThreadPool
from twisted.web.server import Site
from twisted.web.wsgi import WSGIResource
from zope.interface import implementer

from muxtwist._transports import abort, can_half_close
from muxtwist._twisted import asyncio_loop_of, default_reactor
from muxtwist.interfaces import ConnectionInfo, IConnectionInfoFactory

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorThreads

__all__ = ["ASGI", "WSGI", "AsyncioProtocol", "AsyncioReactorRequired", "asyncio_loop"]

log = Logger()

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

    def __init__(self, bridge: _Bridge, transport: ITransport, info: ConnectionInfo | None) -> None:
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
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
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
        self._twisted.write(bytes(data))

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
        self._bridge.aborted = True
        abort(self._twisted)


@implementer(IHalfCloseableProtocol, IPushProducer)
class _Bridge(Protocol):
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
        self.protocol = proto
        self.asyncio_transport = _Transport(self, transport, self._info)
        proto.connection_made(self.asyncio_transport)
        if waiting is not None:
            transport.resumeProducing()  # type: ignore[attr-defined]
            for chunk in waiting:
                if self.lost:
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
        if self.protocol is not None:
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
        from twisted.internet.error import ConnectionDone

        # asyncio calls connection_lost(None) after its own abort() too.
        exc = None if self.aborted or reason.check(ConnectionDone) else reason.value
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
            raise TypeError(f"AsyncioProtocol needs a callable returning an asyncio protocol, got {factory!r}")
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


class _StartingBridge(_Bridge):
    """A bridge that builds its asyncio protocol as soon as it is connected."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.start()


def _uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError as e:  # pragma: no cover - the extra is documented
        raise ImportError("muxtwist.apps.ASGI needs uvicorn: pip install 'muxtwist[asgi]'") from e
    return uvicorn


@implementer(IConnectionInfoFactory)
class ASGI(Factory):
    """
    A rule target serving the ASGI application ``app``: HTTP/1.1 and
    WebSocket, with uvicorn's protocol classes (h11 or httptools; websockets
    or wsproto, whichever uvicorn picks as installed).

    ``doStart`` runs the application's lifespan startup (connections that
    arrive before it completes wait for it); the stop of the factory, or the
    reactor's shutdown, asks every connection to finish gracefully (uvicorn's
    ``shutdown``: idle keep-alive connections close, WebSockets get 1012),
    waits for them up to ``shutdown_timeout`` seconds, then runs the lifespan
    shutdown (given up, with an error logged, after ``shutdown_timeout``
    seconds more). :meth:`when_stopped` fires when that is done.

    :param root_path: the ASGI ``root_path`` (the app mounted below a prefix).
    :param lifespan: ``"auto"`` (run it if the app supports it), ``"on"``
        (its failure refuses connections) or ``"off"``.
    :param uvicorn_options: more ``uvicorn.Config`` options (``ws_max_size``,
        ``timeout_keep_alive``, ``h11_max_incomplete_event_size``...).
    :raises AsyncioReactorRequired: from ``doStart``, under another reactor.
    """

    #: ``python -m muxtwist check`` says so next to the rule.
    needs_asyncio_reactor = True

    def __init__(
        self,
        app: Any,
        *,
        root_path: str = "",
        lifespan: Literal["auto", "on", "off"] = "auto",
        shutdown_timeout: float = 30.0,
        reactor: Any = None,
        **uvicorn_options: Any,
    ) -> None:
        if lifespan not in ("auto", "on", "off"):
            raise ValueError(f"lifespan must be 'auto', 'on' or 'off', got {lifespan!r}")
        if not callable(app):
            raise TypeError(f"ASGI needs an ASGI application (a callable), got {app!r}")
        uvicorn = _uvicorn()
        self.app = app
        self.root_path = root_path
        self.lifespan = lifespan
        self.shutdown_timeout = shutdown_timeout
        self._reactor = reactor
        options = {"log_config": None, "access_log": False, "proxy_headers": False, **uvicorn_options}
        self.config = uvicorn.Config(app, root_path=root_path, lifespan=lifespan, **options)
        self._state: Any = None
        self._lifespan: Any = None
        self._ready: bool | None = None
        self._waiting: list[_Bridge] = []
        self._started_waiters: list[defer.Deferred[bool]] = []
        self._stopping: defer.Deferred[None] | None = None
        self._stopped: defer.Deferred[None] = defer.succeed(None)
        self._trigger: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        name = getattr(self.app, "__qualname__", None) or type(self.app).__qualname__
        return f"ASGI({name}, root_path={self.root_path!r}, lifespan={self.lifespan!r})"

    @property
    def reactor(self) -> Any:
        return default_reactor(self._reactor)

    # Lifecycle

    def startFactory(self) -> None:
        loop = asyncio_loop(self.reactor, "muxtwist.apps.ASGI")
        from uvicorn.lifespan.off import LifespanOff
        from uvicorn.lifespan.on import LifespanOn
        from uvicorn.server import ServerState

        if not self.config.loaded:
            self.config.load()
        self._loop = loop
        self._state = ServerState()
        self._lifespan = LifespanOn(self.config) if self.lifespan != "off" else LifespanOff(self.config)
        self._ready = None
        self._stopping = None
        self._stopped = defer.Deferred()
        startup = defer.Deferred.fromFuture(loop.create_task(self._lifespan.startup()))
        startup.addCallbacks(self._started, self._startup_error)
        self._trigger = self.reactor.addSystemEventTrigger("before", "shutdown", self._stop)

    def _started(self, _: object) -> None:
        failed = bool(getattr(self._lifespan, "should_exit", False))
        if failed:
            log.error("ASGI application {app} failed its lifespan startup: refusing its connections", app=repr(self))
        self._ready = not failed
        started, self._started_waiters = self._started_waiters, []
        for d in started:
            d.callback(not failed)
        waiting, self._waiting = self._waiting, []
        for bridge in waiting:
            if bridge.lost:
                continue
            if failed:
                bridge.refuse()
            else:
                bridge.start()

    def _startup_error(self, failure: Failure) -> None:
        log.failure("ASGI lifespan startup raised", failure)
        self._lifespan.should_exit = True
        self._started(None)

    def stopFactory(self) -> None:
        if self._trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, KeyError):
                pass
            self._trigger = None
        self._stop()

    def _stop(self) -> defer.Deferred[None]:
        """Close connections gracefully, wait for them, run the lifespan shutdown."""
        if self._stopping is not None:
            return self._stopping
        self._stopping = defer.Deferred.fromCoroutine(self._shutdown())
        self._stopping.addErrback(lambda f: log.failure("ASGI shutdown failed", f))
        self._stopping.addBoth(lambda _: self._stopped.callback(None))
        return self._stopping

    async def _shutdown(self) -> None:
        state = self._state
        if state is None:
            return
        reactor = self.reactor
        if self._ready is None:
            # Stopped while the lifespan startup still runs (a cancelled
            # muxtwist.aio.serve): let it finish, for up to shutdown_timeout,
            # so that the shutdown below ends the lifespan it began.
            started = self.when_started()
            started.addTimeout(self.shutdown_timeout, reactor)
            try:
                await started
            except defer.TimeoutError:
                log.error(
                    "ASGI application {app} did not finish its lifespan startup within {timeout} s of the stop",
                    app=repr(self),
                    timeout=self.shutdown_timeout,
                )
        for connection in list(state.connections):
            connection.shutdown()
        deadline = reactor.seconds() + self.shutdown_timeout
        while state.connections and reactor.seconds() < deadline:
            await _sleep(reactor, 0.05)
        for connection in list(state.connections):
            connection.transport.abort()
        # As uvicorn does past its graceful-shutdown timeout: the requests
        # still running are cancelled, so that no application code runs on
        # during or after the lifespan shutdown. They get a moment to unwind.
        for task in list(state.tasks):
            task.cancel()
        deadline = reactor.seconds() + min(1.0, self.shutdown_timeout)
        while state.tasks and reactor.seconds() < deadline:
            await _sleep(reactor, 0.01)
        if self._ready is not None and self._lifespan is not None:
            assert self._loop is not None
            # The application's own shutdown gets shutdown_timeout seconds too:
            # one that never completes must not keep the process from stopping.
            shutdown = defer.Deferred.fromFuture(self._loop.create_task(self._lifespan.shutdown()))
            shutdown.addTimeout(self.shutdown_timeout, reactor)
            try:
                await shutdown
            except (defer.TimeoutError, asyncio.CancelledError):
                # Cancelling the Deferred cancels the task: its CancelledError
                # is asyncio's, which addTimeout does not turn into TimeoutError.
                log.error(
                    "ASGI application {app} did not finish its lifespan shutdown within {timeout} s: given up",
                    app=repr(self),
                    timeout=self.shutdown_timeout,
                )

    def when_started(self) -> defer.Deferred[bool]:
        """A Deferred that fires with whether the lifespan startup succeeded, once it is done."""
        if self._ready is not None:
            return defer.succeed(self._ready)
        d: defer.Deferred[bool] = defer.Deferred()
        self._started_waiters.append(d)
        return d

    def when_stopped(self) -> defer.Deferred[None]:
        """A Deferred that fires once the lifespan shutdown of the last stop is done."""
        d: defer.Deferred[None] = defer.Deferred()

        def fire(result: object) -> object:
            d.callback(None)
            return result

        self._stopped.addBoth(fire)
        return d

    @property
    def connections(self) -> int:
        """How many connections the application is serving now."""
        return len(self._state.connections) if self._state is not None else 0

    # IProtocolFactory

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        return self.buildProtocolForConnection(addr, None, "")

    def buildProtocolForConnection(
        self, addr: IAddress | None, info: ConnectionInfo | None, rule_name: str
    ) -> Protocol | None:
        if self._state is None or self._stopping is not None:
            log.warn("ASGI target {app} is not running: closing {peer}", app=repr(self), peer=addr)
            return None
        if self._ready is False:
            return None
        config, state, lifespan, loop = self.config, self._state, self._lifespan, self._loop

        def build() -> asyncio.BaseProtocol:
            proto: asyncio.BaseProtocol = config.http_protocol_class(
                config=config, server_state=state, app_state=lifespan.state, _loop=loop
            )
            return proto

        bridge = _AppBridge(build, info, self)
        bridge.factory = self
        return bridge


class _AppBridge(_Bridge):
    """A bridge that waits for its ASGI target's lifespan startup."""

    def __init__(self, build: AsyncioProtocolFactory, info: ConnectionInfo | None, target: ASGI) -> None:
        super().__init__(build, info)
        self._target = target

    def connectionMade(self) -> None:
        super().connectionMade()
        target = self._target
        if target._ready is None:
            self.wait()
            target._waiting.append(self)
        else:
            self.start()


def _daemon_thread(**kwargs: Any) -> threading.Thread:
    """A thread for the WSGI pool that does not hold the process open at exit."""
    return threading.Thread(daemon=True, **kwargs)


def _sleep(reactor: Any, seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


class WSGI(Site):
    """
    A rule target serving the WSGI application ``app`` with
    ``twisted.web.wsgi``, each request on a thread from a pool of at most
    ``threads`` threads. The pool starts with the factory (``doStart``) and
    stops with it (``doStop`` returns at once; requests in flight finish on
    their threads, which then end). Requests beyond ``threads`` wait for a
    free thread; the reactor thread never runs the application, so other
    connections are served meanwhile.
    """

    def __init__(self, app: Callable[..., Any], *, threads: int = 10, reactor: IReactorThreads | None = None) -> None:
        if not callable(app):
            raise TypeError(f"WSGI needs a WSGI application (a callable), got {app!r}")
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        reactor = default_reactor(reactor)
        self.app = app
        self.threads = threads
        self.pool = self._new_pool()
        # twisted.web.wsgi only calls callInThread on its pool: this factory
        # stands in for it, so that a restart can use a fresh pool (a stopped
        # ThreadPool cannot start again).
        super().__init__(WSGIResource(reactor, self, app))  # type: ignore[no-untyped-call]

    def _new_pool(self) -> ThreadPool:
        pool = ThreadPool(minthreads=0, maxthreads=self.threads, name="muxtwist-wsgi")
        # Daemon threads: a request still running after the service stopped
        # (its connection aborted at shutdown_timeout) must not keep the
        # process alive once the reactor is gone, as Python waits for every
        # other thread at exit.
        pool.threadFactory = _daemon_thread  # type: ignore[assignment]
        return pool

    def callInThread(self, f: Callable[..., object], *args: object, **kwargs: object) -> None:
        """Run ``f`` on the pool (what ``WSGIResource`` calls for each request)."""
        self.pool.callInThread(f, *args, **kwargs)

    def __repr__(self) -> str:
        name = getattr(self.app, "__qualname__", None) or getattr(self.app, "name", None) or type(self.app).__name__
        return f"WSGI({name}, threads={self.threads})"

    def startFactory(self) -> None:
        super().startFactory()
        if self.pool.joined:
            self.pool = self._new_pool()
        if not self.pool.started:
            self.pool.start()

    def stopFactory(self) -> None:
        if self.pool.started:
            # ThreadPool.stop joins the threads, and a request thread in flight
            # waits for the reactor to write its response: joining on the
            # reactor thread would deadlock, so the old pool is stopped on a
            # thread of its own and a restart gets a fresh one.
            pool, self.pool = self.pool, self._new_pool()
            threading.Thread(target=pool.stop, name="muxtwist-wsgi-stop", daemon=True).start()
        super().stopFactory()
