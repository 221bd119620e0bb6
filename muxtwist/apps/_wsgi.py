"""
:class:`WSGI`: a WSGI application served with ``twisted.web.wsgi`` on a
bounded thread pool that starts and stops with the factory. Its connections
are in :mod:`muxtwist.apps._wsgi_channel`, the pacing of a response's body
to its client in :mod:`muxtwist.apps._wsgi_pacing`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.python.threadpool import ThreadPool
from twisted.web.server import Site
from twisted.web.wsgi import WSGIResource
from zope.interface import implementer

from muxtwist._options import _integer, _number, shown
from muxtwist._twisted import default_reactor
from muxtwist.apps._http import ShutdownTrigger
from muxtwist.apps._wsgi_channel import _half_closing_channel, _HalfClosingGenericChannel
from muxtwist.apps._wsgi_pacing import _Gate, _gated, _paced, _PacedRequest
from muxtwist.interfaces import IRetiringFactory

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorThreads

__all__ = ["WSGI"]


class _PacedResource(WSGIResource):
    """A ``WSGIResource`` whose requests get a :class:`_Gate`, handed to the thread that runs them."""

    def __init__(self, reactor: IReactorThreads, target: WSGI, app: Callable[..., Any]) -> None:
        super().__init__(reactor, target, _paced(app))  # type: ignore[no-untyped-call]
        self._target = target
        self._gate_reactor = reactor

    def render(self, request: Any) -> Any:
        # WSGIResource.render hands the request to the pool (our callInThread) before it returns.
        self._target._next_gate = _Gate(self._gate_reactor, request, self._target.send_timeout)
        try:
            return super().render(request)  # type: ignore[no-untyped-call]
        finally:
            self._target._next_gate = None


def _daemon_thread(**kwargs: Any) -> threading.Thread:
    """A thread for the WSGI pool that does not hold the process open at exit."""
    return threading.Thread(daemon=True, **kwargs)


@implementer(IRetiringFactory)
class WSGI(Site):
    """
    A rule target serving the WSGI application ``app`` with
    ``twisted.web.wsgi``, each request on a thread from a pool of at most
    ``threads`` threads. The pool starts with the factory (``doStart``) and
    stops with it (``doStop`` returns at once; requests in flight finish on
    their threads, which then end). Requests beyond ``threads`` wait for a
    free thread; the reactor thread never runs the application, so other
    connections are served meanwhile. A client that half-closes after its
    requests still gets their responses, then the connection closes.

    When a reload's rules no longer name it (:meth:`retiring`), its
    connections finish as at a stop: idle keep-alive ones close at once,
    busy ones after their answer, HTTP/2 ones get a GOAWAY; ``doStop``, and
    with it the pool's stop, follows once the last has closed.

    A response's body is taken from the application no faster than the
    client reads it; a connection that can take no more of it for
    ``send_timeout`` seconds (60 by default, as nginx's ``send_timeout``) is
    aborted, which frees the thread. That happens to a client that stops
    reading, and to one that reads very slowly: the connection takes more
    only once its write buffers have room again (on Linux loopback a client
    read about 190 KB before its connection took more, so with the default
    60 s, one reading below about 3 KB/s). Over HTTP/2 (ALPN h2 behind
    ``TerminateTLS``) a stream is paced by its flow-control window, by the
    connection's transport and by twisted.web's HTTP/2 queue (64 KiB of each
    stream), so a client that grants large windows and reads nothing holds
    the body as over HTTP/1.1, however many streams it opens.

    A request's head (its request line and headers) must come in full within
    ``header_timeout`` seconds of its first byte (30 by default, as HAProxy's
    ``timeout http-request`` or nginx's ``client_header_timeout``; a total,
    not reset by each byte, so a client sending a byte now and then gains
    nothing): otherwise its client gets ``408 Request Timeout`` and the
    connection closes. That holds for each request of a keep-alive
    connection. ``header_timeout=None`` leaves only twisted.web's idle
    timeout (12 hours, reset by each byte).

    :raises OptionError: (a ``ValueError`` and a ``TypeError``) for a
        ``threads`` that is not a positive integer, or a ``send_timeout`` or
        ``header_timeout`` that is not a positive number of seconds
        (``header_timeout`` may be None).
    """

    protocol = _half_closing_channel
    requestFactory = _PacedRequest

    def __init__(
        self,
        app: Callable[..., Any],
        *,
        threads: int = 10,
        send_timeout: float = 60.0,
        header_timeout: float | None = 30.0,
        reactor: IReactorThreads | None = None,
    ) -> None:
        if not callable(app):
            raise TypeError(f"WSGI needs a WSGI application (a callable), got {shown(app)}")
        _integer("WSGI", "threads", threads)
        _number("WSGI", "send_timeout", send_timeout)
        _number("WSGI", "header_timeout", header_timeout, optional=True)
        self.send_timeout = float(send_timeout)
        self.header_timeout = None if header_timeout is None else float(header_timeout)
        reactor = default_reactor(reactor)
        self._reactor: Any = reactor
        self._channels: weakref.WeakSet[_HalfClosingGenericChannel] = weakref.WeakSet()
        self._trigger = ShutdownTrigger(self.shutdown)
        self.app = app
        self.threads = threads
        self.pool = self._new_pool()
        # twisted.web.wsgi only calls callInThread on its pool: this factory
        # stands in for it, so that a restart can use a fresh pool (a stopped
        # ThreadPool cannot start again).
        self._next_gate: _Gate | None = None
        super().__init__(_PacedResource(reactor, self, app))  # type: ignore[no-untyped-call]

    def _new_pool(self) -> ThreadPool:
        pool = ThreadPool(minthreads=0, maxthreads=self.threads, name="muxtwist-wsgi")
        # Daemon threads: a request still running after the service stopped
        # (its connection aborted at shutdown_timeout) must not keep the
        # process alive once the reactor is gone, as Python waits for every
        # other thread at exit.
        pool.threadFactory = _daemon_thread  # type: ignore[assignment]
        return pool

    def callInThread(self, f: Callable[..., object], *args: object, **kwargs: object) -> None:
        """Run ``f`` on the pool (what ``WSGIResource`` calls for each request, with its gate)."""
        gate, self._next_gate = self._next_gate, None
        if gate is None:
            self.pool.callInThread(f, *args, **kwargs)
            return
        self.pool.callInThread(_gated(gate, f, *args, **kwargs))

    def __repr__(self) -> str:
        name = getattr(self.app, "__qualname__", None) or getattr(self.app, "name", None) or type(self.app).__name__
        return f"WSGI({name}, threads={self.threads})"

    def startFactory(self) -> None:
        super().startFactory()
        if self.pool.joined:
            self.pool = self._new_pool()
        if not self.pool.started:
            self.pool.start()
        self._trigger.add(self._reactor)

    def shutdown(self) -> None:
        """
        Ask every connection to finish, as the reactor's shutdown does: an
        idle keep-alive connection closes at once, a busy one once the
        request it is answering is answered (with ``Connection: close`` if
        its response has not begun). (Otherwise an idle one held the stop
        for the whole ``shutdown_timeout`` and was then reset.) An HTTP/2
        connection gets a GOAWAY at once, which tells its client the last
        stream that will be answered, and closes once its open streams are
        sent in full; a stream its client opens after the GOAWAY is refused
        (RST_STREAM REFUSED_STREAM) and never reaches the application.
        """
        self._finish_connections()

    def retiring(self) -> None:
        """
        The rules no longer name this target (a reload replaced it): its
        connections finish as at :meth:`shutdown`, so that an idle
        keep-alive client does not hold the old target, and its threads,
        until twisted.web's idle timeout (12 hours); ``doStop`` follows once
        the last has closed. Nothing is refused and the pool keeps running:
        if later rules name this target again, it serves their connections
        as before.
        """
        self._finish_connections()

    def _finish_connections(self) -> None:
        for channel in list(self._channels):
            channel.finish_and_close(self._reactor)

    def stopFactory(self) -> None:
        self._trigger.remove()
        if self.pool.started:
            # ThreadPool.stop joins the threads, and a request thread in flight
            # waits for the reactor to write its response: joining on the
            # reactor thread would deadlock, so the old pool is stopped on a
            # thread of its own and a restart gets a fresh one.
            pool, self.pool = self.pool, self._new_pool()
            threading.Thread(target=pool.stop, name="muxtwist-wsgi-stop", daemon=True).start()
        super().stopFactory()
