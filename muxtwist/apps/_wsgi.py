"""
:class:`WSGI`: a WSGI application served with ``twisted.web.wsgi`` on a
bounded thread pool that starts and stops with the factory.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site
from twisted.web.wsgi import WSGIResource
from zope.interface import implementer

from muxtwist._options import _integer, _number, shown
from muxtwist._twisted import (
    default_reactor,
    generic_http_channel_base,
    http_channel_busy,
    http_head_coming,
    http_inner_channel,
)
from muxtwist.apps._http import PARTIAL_REQUEST_GRACE, REQUEST_TIMEOUT_RESPONSE
from muxtwist.interfaces import IRetiringFactory

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorThreads

__all__ = ["WSGI"]


#: The flow-control gate of the request the current pool thread is running.
_running = threading.local()


log = Logger(namespace="muxtwist.apps")

#: Bytes of one HTTP/2 stream's body that may wait in twisted.web's
#: H2Connection, unsent, before the application is asked for no more.
H2_STREAM_BACKLOG = 65536


@implementer(IPushProducer)
class _Gate:
    """
    The producer of one WSGI response: the connection pauses it when its
    write buffer is full and resumes it once drained, and the application's
    thread waits on it between two chunks of the body. ``twisted.web.wsgi``
    alone hands every chunk to the transport as fast as the application
    makes them, so a client that reads slowly had the whole body buffered
    in memory (300 MB for a 300 MB response).
    """

    def __init__(self, reactor: IReactorThreads, request: Any, send_timeout: float) -> None:
        self._reactor = reactor
        self._request = request
        self._send_timeout = send_timeout
        self._open = threading.Event()
        self._open.set()
        #: Set once the request has finished or its client has left.
        self.done = False
        request.registerProducer(self, True)
        # Finished or gone (the client left, the stop aborted it): never wait again.
        request.notifyFinish().addBoth(self._finished)

    def _finished(self, _: object) -> None:
        self.done = True
        self._update()

    #: Paused by its stream (or HTTP/1.1 connection), held by an HTTP/2 connection whose transport is full,
    #: or whose own queue holds more than H2_STREAM_BACKLOG bytes of this stream.
    _paused = False
    _held = False
    _backlogged = False
    #: The pacer of the HTTP/2 connection carrying this response, if any.
    pacer: _H2Pacer | None = None

    def _update(self) -> None:
        if self.done or not (self._paused or self._held or self._backlogged):
            self._open.set()
        else:
            self._open.clear()

    def pauseProducing(self) -> None:
        self._paused = True
        self._update()

    def resumeProducing(self) -> None:
        self._paused = False
        self._update()

    def stopProducing(self) -> None:
        self._paused = self._held = self._backlogged = False
        self._update()

    def hold(self, held: bool) -> None:
        """The HTTP/2 connection's transport is full (or has room again), which no flow-control window says."""
        self._held = held
        self._update()

    def backlog(self, held: bool) -> None:
        """The HTTP/2 connection holds more of this stream than it has sent (or has sent enough of it)."""
        self._backlogged = held
        self._update()

    def written(self) -> None:
        """On the reactor: the request wrote a chunk of the body."""
        if self.pacer is not None:
            self.pacer.written(self._request.channel)

    def wait(self) -> None:
        """
        On the application's thread: until the connection can take more. A
        connection that can take no more for ``send_timeout`` seconds is cut
        off (aborted, ``done`` set), so that clients that stop reading cannot
        hold every thread of the pool. It takes more once Twisted's write
        buffer has gone into the socket and the kernel finds room in its send
        buffer, so a client that reads very slowly is cut off too.
        """
        # Beyond TIMEOUT_MAX (about 292 years) the wait would raise OverflowError.
        if not self._open.wait(min(self._send_timeout, threading.TIMEOUT_MAX)):
            self.done = True
            self._reactor.callFromThread(self._abort)

    def _abort(self) -> None:
        channel = getattr(self._request, "channel", None)
        transport = getattr(channel, "transport", None)
        if transport is not None:
            log.info(
                "WSGI: a connection could take no more of its response for {timeout}s (send_timeout): aborted",
                timeout=self._send_timeout,
            )
            transport.abortConnection()

    def release(self) -> None:
        """On the application's thread: the body is done (queued before ``twisted.web.wsgi`` finishes the request)."""
        self._reactor.callFromThread(self._unregister)

    def _unregister(self) -> None:
        request = self._request
        # A request that has finished has let go of its channel.
        if request.producer is self and getattr(request, "channel", None) is not None:
            request.unregisterProducer()


class _PacedRequest(Request):
    """twisted.web's request, telling its :class:`_Gate` of each chunk written."""

    def write(self, data: bytes) -> None:
        super().write(data)  # type: ignore[no-untyped-call]
        if isinstance(self.producer, _Gate):
            self.producer.written()


def _paced(app: Callable[..., Any]) -> Callable[..., Any]:
    """``app``, its body iterated no faster than the connection takes it."""

    def paced(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        gate: _Gate | None = getattr(_running, "gate", None)
        if gate is None:
            return app(environ, start_response)  # type: ignore[no-any-return]
        try:
            body = app(environ, start_response)
        except BaseException:
            gate.release()
            raise
        return _paced_body(body, gate)

    return paced


def _paced_body(body: Iterable[bytes], gate: _Gate) -> Iterator[bytes]:
    try:
        for chunk in body:
            yield chunk
            # The chunk is with the transport now: no next one until it drains.
            gate.wait()
            if gate.done:
                # The client left while paused: ask the body for nothing more.
                return
    finally:
        try:
            close = getattr(body, "close", None)
            if close is not None:
                close()
        finally:
            gate.release()


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


@implementer(IHalfCloseableProtocol)
class _HalfClosingChannel(HTTPChannel):
    """
    twisted.web's HTTP/1.1 channel, answering the requests a client sent
    before it half-closed: a plain ``HTTPChannel`` is not half-closeable, so
    the client's FIN closed the connection while the application still ran
    on its thread, and its response was lost.
    """

    _read_closed = False
    #: Seconds a request's head may take from its first byte (the target's
    #: ``header_timeout``); None: no bound but twisted.web's idle timeout.
    header_timeout: float | None = None
    _head_deadline: IDelayedCall | None = None

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)  # type: ignore[no-untyped-call]
        if self.header_timeout is not None:
            self._watch_head(self.header_timeout)

    def _watch_head(self, timeout: float) -> None:
        # A timer only when a read leaves a head unfinished (a head that came
        # whole in one read costs one look); it is not reset by later bytes.
        if http_head_coming(self):
            if self._head_deadline is None and self.transport is not None:
                self._head_deadline = self.callLater(timeout, self._head_timed_out)  # type: ignore[no-untyped-call]
        elif self._head_deadline is not None:
            self._stop_head_deadline()

    def _stop_head_deadline(self) -> None:
        if self._head_deadline is not None and self._head_deadline.active():
            self._head_deadline.cancel()
        self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport is None or not http_head_coming(self):
            return
        # Nothing of this request's answer has been sent: the one before it,
        # if any, was answered in full before its head began.
        log.info(
            "WSGI: a request's head did not come in full within {timeout}s (header_timeout): 408, closing {peer}",
            timeout=self.header_timeout,
            peer=str(self.transport.getPeer()),
        )
        self.transport.write(REQUEST_TIMEOUT_RESPONSE)
        self.loseConnection()  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_head_deadline()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def finish_and_close(self) -> None:
        """
        Close now if idle, else once the request being answered is (a
        graceful stop): a response not begun yet says ``Connection: close``,
        so that its client sends no next request on a connection closing.
        """
        self._read_closed = True
        # HTTPChannel.requests and persistent, Request.startedWriting and
        # responseHeaders are public attributes. A request whose line came
        # but not all its headers is in requests, not busy yet: it is
        # answered too (requestDone closes after it), not dropped unanswered.
        if not http_channel_busy(self) and not self.requests:
            if self.transport is not None:
                self.loseConnection()  # type: ignore[no-untyped-call]
            return
        if self.requests and not self.requests[0].startedWriting:
            self.persistent = False
            self.requests[0].responseHeaders.setRawHeaders(b"connection", [b"close"])
        if not http_channel_busy(self):
            # Its headers still coming: they get PARTIAL_REQUEST_GRACE seconds
            # without a byte (TimeoutMixin's idle timer, public), not the
            # site's idle timeout (12 hours by default) holding a retired target.
            grace = PARTIAL_REQUEST_GRACE
            self.setTimeout(min(self.timeOut or grace, grace))  # type: ignore[no-untyped-call]

    def readConnectionLost(self) -> None:
        self._read_closed = True
        # A request being handled (and any complete ones pipelined behind it)
        # is answered first; a partial one can never complete.
        if not http_channel_busy(self):
            self.loseConnection()  # type: ignore[no-untyped-call]

    def writeConnectionLost(self) -> None:
        pass

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)  # type: ignore[no-untyped-call]
        if self._read_closed and not http_channel_busy(self):
            self.loseConnection()  # type: ignore[no-untyped-call]


@implementer(IPushProducer)
class _H2Pacer:
    """
    The producer of an HTTP/2 connection's transport, in front of
    twisted.web's ``H2Connection``: when the transport is full it also holds
    the :class:`_Gate` of every stream. ``H2Connection`` alone only stops
    sending and goes on queueing what the streams write, up to their
    flow-control windows, which the client sets (up to 2 GiB each): a client
    that granted large windows and read nothing had a whole large response
    queued in memory.
    """

    def __init__(self, connection: Any, reactor: Any) -> None:
        self.connection = connection
        self.paused = False
        self._reactor = reactor
        #: Streams whose gates wait for the H2Connection to send their backlog.
        self._backlogged: dict[Any, _Gate] = {}
        self._look: Any = None

    def hold_streams(self) -> None:
        # H2Connection.streams and H2Stream.producer are public attributes.
        for stream in list(self.connection.streams.values()):
            gate = stream.producer
            if isinstance(gate, _Gate):
                gate.pacer = self
                gate.hold(self.paused)

    def _queued(self, stream: Any) -> int | None:
        """Bytes of ``stream``'s body the H2Connection holds unsent (None once it has ended)."""
        # H2Stream.streamID, H2Connection.remainingOutboundWindow and conn (h2's state machine) are public.
        stream_id = getattr(stream, "streamID", None)
        if self.connection.streams.get(stream_id) is not stream:
            return None
        try:
            window: int = self.connection.conn.local_flow_control_window(stream_id)
            remaining: int = self.connection.remainingOutboundWindow(stream_id)
        except Exception:  # h2 says the stream has closed
            return None
        return window - remaining

    def written(self, stream: Any) -> None:
        """
        ``stream`` wrote a chunk. H2Connection sends one frame (16 KiB) a
        reactor turn across all its streams and queues the rest up to each
        stream's flow-control window, which the client sets (up to 2 GiB):
        past ``H2_STREAM_BACKLOG`` the stream's gate waits for it to be sent.
        """
        gate = getattr(stream, "producer", None)
        queued = self._queued(stream)
        if isinstance(gate, _Gate) and queued is not None and queued > H2_STREAM_BACKLOG:
            gate.backlog(True)
            self._backlogged[stream] = gate
            self.look_later()

    def look_later(self) -> None:
        """Look at the backlogs on the next reactor turn, if one may have shrunk (not while stalled)."""
        if self._look is None and not self.paused and any(map(self._moving, self._backlogged)):
            self._look = self._reactor.callLater(0, self._look_at_backlogs)

    def _moving(self, stream: Any) -> bool:
        try:
            return bool(self.connection.conn.local_flow_control_window(stream.streamID) > 0)
        except Exception:
            return True  # closed: looked at once more, to let its gate go

    def _look_at_backlogs(self) -> None:
        self._look = None
        for stream, gate in list(self._backlogged.items()):
            queued = self._queued(stream)
            if queued is None or queued <= H2_STREAM_BACKLOG:
                del self._backlogged[stream]
                gate.backlog(False)
        # Again while the H2Connection sends (one frame a turn); a stalled
        # stream is looked at again when the transport drains or data comes in.
        self.look_later()

    def release(self) -> None:
        """Let every gate go and look no more (the connection has ended)."""
        if self._look is not None and self._look.active():
            self._look.cancel()
        self._look = None
        for gate in self._backlogged.values():
            gate.backlog(False)
        self._backlogged.clear()

    def pauseProducing(self) -> None:
        self.paused = True
        self.connection.pauseProducing()
        self.hold_streams()

    def resumeProducing(self) -> None:
        self.paused = False
        self.hold_streams()
        self.connection.resumeProducing()
        self.look_later()

    def stopProducing(self) -> None:
        self.paused = False
        self.hold_streams()
        self.release()
        self.connection.stopProducing()


class _RefusingH2State:
    """
    The h2 state machine of twisted.web's ``H2Connection`` (its public
    ``conn``) once we have sent a GOAWAY naming ``last_stream_id``: a stream
    the client opens above it is refused (RST_STREAM REFUSED_STREAM, so that
    its client may send it again elsewhere) and none of its events reach the
    ``H2Connection``, which would hand it to the application (RFC 9113
    section 6.8). Its HEADERS are still decoded by h2, which keeps the HPACK
    state both ends share, and the bytes of its body go back to the
    connection's flow-control window. Everything else is h2's own.
    """

    def __init__(self, inner: Any, last_stream_id: int) -> None:
        self._inner = inner
        self.last_stream_id = last_stream_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _refused(self, stream_id: int) -> bool:
        # Client-initiated streams have odd ids; 0 is the connection itself.
        return stream_id > self.last_stream_id and stream_id % 2 == 1

    def receive_data(self, data: bytes) -> list[Any]:
        from h2.errors import ErrorCodes  # h2 is there since HTTP/2 is being spoken
        from h2.events import DataReceived, RequestReceived
        from h2.exceptions import StreamClosedError

        kept: list[Any] = []
        for event in self._inner.receive_data(data):
            stream_id = getattr(event, "stream_id", 0) or 0
            if not self._refused(stream_id):
                kept.append(event)
            elif isinstance(event, RequestReceived):
                log.debug(
                    "HTTP/2: stream {stream} opened after our GOAWAY (last stream {last}) refused",
                    stream=stream_id,
                    last=self.last_stream_id,
                )
                try:
                    self._inner.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
                except StreamClosedError:
                    pass  # the client has reset it already, in the same read
            elif isinstance(event, DataReceived):
                # The frames that come once the RST_STREAM is on its way h2 gives back itself.
                self._inner.acknowledge_received_data(event.flow_controlled_length, stream_id)
        return kept


@implementer(IHalfCloseableProtocol)
class _HalfClosingGenericChannel(generic_http_channel_base()):  # type: ignore[misc]
    """Site's protocol (HTTP/1.1, or HTTP/2 when ALPN says so) passing half-closes to an HTTP/1.1 channel."""

    #: How often a stop looks whether an HTTP/2 connection's last stream has been sent.
    h2_poll = 0.05
    _lost = False

    def finish_and_close(self, reactor: Any) -> None:
        """
        A graceful stop: an HTTP/1.1 connection closes now if idle, else once
        the requests already received are answered; an HTTP/2 one gets a
        GOAWAY (no new streams: those the client opens after it are refused
        with REFUSED_STREAM) and closes once its open streams are sent.
        """
        channel = http_inner_channel(self)
        if isinstance(channel, _HalfClosingChannel):
            channel.finish_and_close()
        elif channel is not None and channel.transport is not None and not self._lost:
            if isinstance(channel.conn, _RefusingH2State):
                # Finishing already (retiring, then a stop): one GOAWAY is
                # enough, and a later one must not name a higher stream.
                return
            from hyperframe.frame import GoAwayFrame  # h2's, there since HTTP/2 is being spoken

            # twisted.web's H2Connection: conn is its h2 state machine, streams
            # the streams not yet sent in full (both public attributes). The
            # GOAWAY is written past the state machine: h2 takes one it sends
            # as the end of the connection, and would refuse the frames still
            # to come both ways (the client's WINDOW_UPDATEs, the answers).
            # Every stream up to the highest the client has opened is known
            # to the H2Connection and will be answered; none above it will.
            last_stream_id: int = channel.conn.highest_inbound_stream_id
            goaway = GoAwayFrame(0)
            goaway.last_stream_id = last_stream_id
            channel.conn = _RefusingH2State(channel.conn, last_stream_id)
            channel.transport.write(goaway.serialize())
            self._close_when_sent(channel, reactor)

    def _close_when_sent(self, channel: Any, reactor: Any) -> None:
        # twisted.web tells no one when an HTTP/2 stream has been sent: look.
        if self._lost or channel.transport is None:
            return
        if channel.streams:
            reactor.callLater(self.h2_poll, self._close_when_sent, channel, reactor)
        else:
            # The H2Connection is its transport's producer, and a TLS
            # transport closes only once its producer has gone.
            channel.transport.unregisterProducer()
            channel.transport.loseConnection()

    _pacer: _H2Pacer | None = None

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        channel = http_inner_channel(self)
        if self._pacer is None:
            if isinstance(channel, _HalfClosingChannel) or channel is None or channel.transport is None:
                return
            # Switched to HTTP/2 (by ALPN): stand between the transport and the H2Connection.
            self._pacer = _H2Pacer(channel, default_reactor(getattr(self.factory, "_reactor", None)))
            channel.transport.unregisterProducer()
            channel.transport.registerProducer(self._pacer, True)
        # Streams this data opened get the pacer (and are held while the
        # transport is still full); a WINDOW_UPDATE may let a backlog move.
        self._pacer.hold_streams()
        self._pacer.look_later()

    def connectionLost(self, reason: Any) -> None:
        self._lost = True
        if self._pacer is not None:
            self._pacer.release()
        super().connectionLost(reason)

    def readConnectionLost(self) -> None:
        channel = http_inner_channel(self)
        if IHalfCloseableProtocol.providedBy(channel):
            channel.readConnectionLost()
        elif channel.transport is not None:
            channel.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


def _half_closing_channel(site: object) -> _HalfClosingGenericChannel:
    """What ``WSGI.buildProtocol`` builds (called as a method of the site, as Twisted's own default is)."""
    inner = _HalfClosingChannel()  # type: ignore[no-untyped-call]
    inner.header_timeout = getattr(site, "header_timeout", None)
    channel = _HalfClosingGenericChannel(inner)
    channels = getattr(site, "_channels", None)
    if channels is not None:
        # The outer channel: it stays the connection's protocol when HTTP/2 replaces the HTTP/1.1 one.
        channels.add(channel)
    return channel


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
        self._trigger: Any = None
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

        def run() -> None:
            _running.gate = gate
            try:
                f(*args, **kwargs)
            finally:
                _running.gate = None

        self.pool.callInThread(run)

    def __repr__(self) -> str:
        name = getattr(self.app, "__qualname__", None) or getattr(self.app, "name", None) or type(self.app).__name__
        return f"WSGI({name}, threads={self.threads})"

    def startFactory(self) -> None:
        super().startFactory()
        if self.pool.joined:
            self.pool = self._new_pool()
        if not self.pool.started:
            self.pool.start()
        if self._trigger is None:
            self._trigger = self._reactor.addSystemEventTrigger("before", "shutdown", self.shutdown)

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
        if self._trigger is not None:
            try:
                self._reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, KeyError):
                pass
            self._trigger = None
        if self.pool.started:
            # ThreadPool.stop joins the threads, and a request thread in flight
            # waits for the reactor to write its response: joining on the
            # reactor thread would deadlock, so the old pool is stopped on a
            # thread of its own and a restart gets a fresh one.
            pool, self.pool = self.pool, self._new_pool()
            threading.Thread(target=pool.stop, name="muxtwist-wsgi-stop", daemon=True).start()
        super().stopFactory()
