"""
:class:`ASGI`: an ASGI application served in-process with uvicorn's
HTTP/1.1 and WebSocket protocol classes, driven through the asyncio adapter
(:mod:`muxtwist.apps._asyncio`), its lifespan tied to the factory's
``doStart``/``doStop``. It needs Twisted's asyncio reactor (the application
is asyncio code).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Literal

from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from muxtwist._options import _integer, _number, shown
from muxtwist._twisted import default_reactor
from muxtwist.apps._asyncio import AsyncioProtocolFactory, Bridge, asyncio_loop
from muxtwist.apps._http import PARTIAL_REQUEST_GRACE, REQUEST_TIMEOUT_RESPONSE, HeadDeadline, ShutdownTrigger
from muxtwist.interfaces import ConnectionInfo, IConnectionInfoFactory, IRetiringFactory

__all__ = ["ASGI"]

log = Logger(namespace="muxtwist.apps")

#: The numeric ``uvicorn.Config`` options the protocol classes use on each
#: connection, and whether ``None`` is one of their values: a bad one is
#: refused when the target is built, not at every connection.
_UVICORN_SECONDS = {"timeout_keep_alive": False, "ws_ping_interval": True, "ws_ping_timeout": True}
_UVICORN_COUNTS = {
    "ws_max_size": False,
    "ws_max_queue": False,
    "limit_concurrency": True,
    "h11_max_incomplete_event_size": True,
}


def _uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError as e:  # pragma: no cover - the extra is documented
        raise ImportError("muxtwist.apps.ASGI needs uvicorn: pip install 'muxtwist[asgi]'") from e
    return uvicorn


@implementer(IConnectionInfoFactory, IRetiringFactory)
class ASGI(Factory):
    """
    A rule target serving the ASGI application ``app``: HTTP/1.1 and
    WebSocket, with uvicorn's protocol classes (h11 or httptools; websockets
    or wsproto, whichever uvicorn picks as installed).

    ``doStart`` runs the application's lifespan startup (connections that
    arrive before it completes wait for it, and are finished as soon as it
    completes if the target was asked to finish meanwhile); the stop of the factory, or the
    reactor's shutdown, asks every connection to finish gracefully (uvicorn's
    ``shutdown``: idle keep-alive connections close, WebSockets get 1012),
    waits for them up to ``shutdown_timeout`` seconds, then runs the lifespan
    shutdown (given up, with an error logged, after ``shutdown_timeout``
    seconds more). :meth:`when_stopped` fires when that is done.

    When a reload's rules no longer name it (:meth:`retiring`), its HTTP
    connections finish (idle keep-alive ones close at once, busy ones after
    their response) and its WebSockets go on; the stop above follows once
    the last connection has ended. At a stop as at a reload, a request whose
    headers are still coming is answered before its connection closes
    (given up after 10 seconds without a byte, or at ``header_timeout``).

    A request's head (its request line and headers) must come in full within
    ``header_timeout`` seconds of its first byte (30 by default, as HAProxy's
    ``timeout http-request`` or nginx's ``client_header_timeout``; a total,
    not reset by each byte, so a client sending a byte now and then gains
    nothing): otherwise its client gets ``408 Request Timeout`` and the
    connection closes. That holds for each request of a keep-alive
    connection; uvicorn's protocols have no such timer (``timeout_keep_alive``
    ends at a request's first byte). ``header_timeout=None``: no bound.

    :param root_path: the ASGI ``root_path`` (the app mounted below a prefix).
    :param lifespan: ``"auto"`` (run it if the app supports it), ``"on"``
        (its failure refuses connections) or ``"off"``.
    :param shutdown_timeout: seconds, a positive number.
    :param header_timeout: seconds, a positive number, or None.
    :param uvicorn_options: more ``uvicorn.Config`` options (``ws_max_size``,
        ``timeout_keep_alive``, ``h11_max_incomplete_event_size``...).
    :raises OptionError: (a ``ValueError`` and a ``TypeError``) for a
        ``shutdown_timeout``, a ``header_timeout`` (unless None), or a
        numeric uvicorn option, that is not a positive number (NaN, infinity, a bool or a string included).
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
        header_timeout: float | None = 30.0,
        reactor: Any = None,
        **uvicorn_options: Any,
    ) -> None:
        if lifespan not in ("auto", "on", "off"):
            raise ValueError(f"lifespan must be 'auto', 'on' or 'off', got {shown(lifespan)}")
        if not callable(app):
            raise TypeError(f"ASGI needs an ASGI application (a callable), got {shown(app)}")
        _number("ASGI", "shutdown_timeout", shutdown_timeout)
        _number("ASGI", "header_timeout", header_timeout, optional=True)
        for name, optional in _UVICORN_SECONDS.items():
            if name in uvicorn_options:
                _number("ASGI", name, uvicorn_options[name], optional=optional)
        for name, optional in _UVICORN_COUNTS.items():
            if name in uvicorn_options:
                _integer("ASGI", name, uvicorn_options[name], optional=optional)
        uvicorn = _uvicorn()
        self.app = app
        self.root_path = root_path
        self.lifespan = lifespan
        self.shutdown_timeout = shutdown_timeout
        self.header_timeout = None if header_timeout is None else float(header_timeout)
        self._reactor = reactor
        options = {"log_config": None, "access_log": False, "proxy_headers": False, **uvicorn_options}
        self.config = uvicorn.Config(app, root_path=root_path, lifespan=lifespan, **options)
        self._state: Any = None
        self._lifespan: Any = None
        self._ready: bool | None = None
        self._waiting: list[_AppBridge] = []
        self._bridges: set[_AppBridge] = set()
        self._started_waiters: list[defer.Deferred[bool]] = []
        self._stopping: defer.Deferred[None] | None = None
        self._stopped: defer.Deferred[None] = defer.succeed(None)
        self._trigger = ShutdownTrigger(self._stop)
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
        self._trigger.add(self.reactor)

    def _started(self, _: object) -> None:
        failed = bool(getattr(self._lifespan, "should_exit", False))
        if failed:
            log.error("ASGI application {app} failed its lifespan startup: refusing its connections", app=repr(self))
        self._ready = not failed
        # The connections that waited start before anyone waiting for the
        # startup hears of it: a stop waiting for it then finds them among
        # the connections it asks to finish and waits for.
        waiting, self._waiting = self._waiting, []
        for bridge in waiting:
            if bridge.lost:
                continue
            if failed:
                bridge.refuse()
            else:
                bridge.start()
        started, self._started_waiters = self._started_waiters, []
        for d in started:
            d.callback(not failed)

    def _startup_error(self, failure: Failure) -> None:
        log.failure("ASGI lifespan startup raised", failure)
        self._lifespan.should_exit = True
        self._started(None)

    def stopFactory(self) -> None:
        self._trigger.remove()
        self._stop()

    def shutdown(self) -> defer.Deferred[None]:
        """
        Stop now, as the reactor's shutdown does: ask every connection to
        finish (idle keep-alive ones close at once), wait for them up to
        ``shutdown_timeout``, abort the rest, then run the lifespan shutdown.
        The Deferred fires once that is done. Whoever stops a service that is
        not the reactor's (``muxtwist.aio``'s ``close``) calls it: the
        factory's own stop comes only once its last connection has ended.
        """
        if self._state is None:
            return defer.succeed(None)  # never started: nothing to stop
        return self._stop()

    def retiring(self) -> None:
        """
        The rules no longer name this target (a reload replaced it): each
        HTTP connection is asked to finish as at a stop (uvicorn's
        ``shutdown``), so that an idle keep-alive client does not hold the
        old application until uvicorn's ``timeout_keep_alive``. WebSockets
        are left alone (a stop would close them with 1012, a reload must
        not), and so is the lifespan: its shutdown runs at ``doStop``, once
        no connection uses the target. Nothing is refused: if later rules
        name this target again, it serves their connections as before.
        """
        self._finish_connections(websockets=False)

    def _finish_connections(self, *, websockets: bool) -> None:
        """
        uvicorn's graceful ``shutdown`` of each connection (of each HTTP one
        only, without ``websockets``): see :meth:`_AppBridge.finish`.
        """
        if self._state is None:
            return
        for bridge in list(self._bridges):
            bridge.finish(websockets=websockets)

    def _is_websocket(self, protocol: object) -> bool:
        # A connection upgraded to a WebSocket is an instance of the
        # configured ws_protocol_class (it replaces the HTTP one).
        ws_class = getattr(self.config, "ws_protocol_class", None)
        return ws_class is not None and isinstance(protocol, ws_class)

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
                # Given up: the connections still waiting for it are closed
                # now, unserved, not left to the service's abort (or to an
                # application whose startup ends after its stop).
                waiting, self._waiting = self._waiting, []
                for bridge in waiting:
                    if not bridge.lost:
                        bridge.refuse()
        self._finish_connections(websockets=True)
        deadline = reactor.seconds() + self.shutdown_timeout
        # As uvicorn: the connections, and then the requests still running
        # once their connection has ended (the work an application does
        # after its response, Starlette's BackgroundTasks), get until then.
        while (state.connections or state.tasks) and reactor.seconds() < deadline:
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


class _AppBridge(Bridge):
    """
    A bridge that waits for its ASGI target's lifespan startup, and that
    finishes its connection when the target asks (:meth:`finish`).
    """

    def __init__(self, build: AsyncioProtocolFactory, info: ConnectionInfo | None, target: ASGI) -> None:
        super().__init__(build, info)
        self._target = target
        # Asked to finish, not done yet: whether its WebSocket is to be
        # finished too (a stop) or left alone (a reload); None: not asked.
        self._finishing: bool | None = None
        self._grace: IDelayedCall | None = None
        self._head_deadline = HeadDeadline()

    def connectionMade(self) -> None:
        super().connectionMade()
        target = self._target
        target._bridges.add(self)
        if target._ready is None:
            self.wait()
            target._waiting.append(self)
        else:
            self.start()

    def finish(self, *, websockets: bool) -> None:
        """
        The target is asked to finish: uvicorn's graceful ``shutdown`` of
        this connection (an idle one closes, a request being answered closes
        after its response), a WebSocket's only with ``websockets``. A
        connection still waiting for the lifespan startup is finished once
        it starts (the request it sent meanwhile served first), and one
        whose request's headers are still coming once they have all come
        (that request served first), or after ``PARTIAL_REQUEST_GRACE``
        seconds without a byte: uvicorn's ``shutdown`` would close it with
        that request unanswered, and it has no timer of its own then.
        """
        self._finishing = websockets or bool(self._finishing)
        self._finish()

    def start(self) -> None:
        super().start()
        self._watch_head()
        self._finish()

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self._watch_head()
        self._finish()

    def _watch_head(self) -> None:
        timeout, proto = self._target.header_timeout, self.protocol
        if timeout is None or proto is None:
            return
        # Pending, not only coming: a head pipelined behind a request still
        # being answered is held by uvicorn until that response ends, and no
        # read of ours follows then; its deadline starts at this read too.
        if not _request_head_coming(proto, queued=True):
            self._head_deadline.stop()
        elif not (self.lost or self.closed):
            self._head_deadline.start(self._target.reactor.callLater, timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        proto = self.protocol
        if proto is None or self.lost or self.closed:
            return
        if not _request_head_coming(proto):
            if _request_head_coming(proto, queued=True) and (timeout := self._target.header_timeout) is not None:
                # Behind a response still being sent, which a 408 cannot
                # interrupt: looked at again, so that it comes at most
                # header_timeout after that response has ended.
                self._head_deadline.start(self._target.reactor.callLater, timeout, self._head_timed_out)
            return
        # No request being answered (_request_head_coming says so): nothing
        # of an answer to this one has been sent.
        log.info(
            "ASGI: a request's head did not come in full within {timeout}s (header_timeout): 408, closing {peer}",
            timeout=self._target.header_timeout,
            peer=str(self.transport.getPeer()) if self.transport is not None else None,
        )
        self._finishing = None
        self._stop_grace()
        transport = getattr(proto, "transport", None)  # the asyncio transport uvicorn writes to
        if transport is not None:
            transport.write(REQUEST_TIMEOUT_RESPONSE)
            transport.close()

    def _finish(self) -> None:
        websockets, proto = self._finishing, self.protocol
        if websockets is None or proto is None or self.lost or self.closed:
            return  # not asked, or not started yet (start() comes back here), or over
        if self._target._is_websocket(proto):
            self._finishing = None
            if websockets:
                proto.shutdown()  # type: ignore[attr-defined]
            return
        if _request_head_coming(proto):
            if self._grace is not None and self._grace.active():
                self._grace.reset(PARTIAL_REQUEST_GRACE)
            else:
                self._grace = self._target.reactor.callLater(PARTIAL_REQUEST_GRACE, self._grace_over)
            return
        self._finishing = None
        self._stop_grace()
        proto.shutdown()  # type: ignore[attr-defined]

    def _grace_over(self) -> None:
        self._grace = None
        proto = self.protocol
        if proto is not None and not (self.lost or self.closed):
            self._finishing = None
            # No request being answered: uvicorn's shutdown closes it.
            proto.shutdown()  # type: ignore[attr-defined]

    def _stop_grace(self) -> None:
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_grace()
        self._head_deadline.stop()
        self._target._bridges.discard(self)
        super().connectionLost(reason)


def _request_head_coming(protocol: object, *, queued: bool = False) -> bool:
    """
    Whether uvicorn's HTTP/1.1 protocol (h11's or httptools') has part of a
    request's head, not all of it, and no request being answered (what its
    ``shutdown`` would close unanswered); with ``queued``, also when an
    earlier request on the connection (one pipelined before it) is still
    being answered. With a protocol class it does not know, False: the
    connection is finished as uvicorn finishes it.
    """
    if not queued:
        # uvicorn's own shutdown reads cycle and response_complete the same way.
        cycle = getattr(protocol, "cycle", None)
        if cycle is not None and not getattr(cycle, "response_complete", True):
            return False
    conn = getattr(protocol, "conn", None)
    h11 = sys.modules.get("h11")
    if h11 is not None and isinstance(conn, h11.Connection):
        data, closed = conn.trailing_data  # h11's public view of what it has not parsed yet
        # DONE: the earlier request has come in full; h11 parses no more of
        # what follows it until its response has been sent.
        idle = conn.their_state is h11.IDLE or (queued and conn.their_state is h11.DONE)
        return idle and bool(data) and not closed
    parser = getattr(protocol, "parser", None)
    httptools = sys.modules.get("httptools")
    if httptools is not None and isinstance(parser, httptools.HttpRequestParser):
        # The parser calls on_message_begin at a request's first byte (a
        # pipelined one's too: it parses every byte as it comes), where
        # uvicorn starts a new scope, and on_headers_complete once the head
        # is whole, where uvicorn gives that scope its "method" first.
        scope = getattr(protocol, "scope", None)
        return isinstance(scope, dict) and "method" not in scope
    return False


def _sleep(reactor: Any, seconds: float) -> defer.Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)
