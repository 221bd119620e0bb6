"""
How fast a WSGI response's body is taken from the application: no faster
than its client reads it. Each request gets a :class:`_Gate`, the producer
its connection pauses and resumes, on which the application's thread waits
between two chunks of the body (and gives up after ``send_timeout``); an
HTTP/2 connection gets an :class:`_H2Pacer` in front of twisted.web's
``H2Connection``, which holds every stream's gate while the transport is
full or the connection's queue of that stream grows past
``H2_STREAM_BACKLOG``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorThreads

__all__ = ["H2_STREAM_BACKLOG"]


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


def _gated(gate: _Gate, f: Callable[..., object], *args: object, **kwargs: object) -> Callable[[], None]:
    """``f`` to run on a pool thread, the body of the response it makes paced by ``gate`` (:func:`_paced` finds it)."""

    def run() -> None:
        _running.gate = gate
        try:
            f(*args, **kwargs)
        finally:
            _running.gate = None

    return run


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
