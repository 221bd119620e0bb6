"""
The connections of the :class:`~muxtwist.apps.WSGI` target: twisted.web's
channels, made to answer the requests a client sent before it half-closed,
to bound the time a request's head may take (``header_timeout``, a 408),
and to finish when the target is asked to (a stop, a reload): an HTTP/1.1
connection closes once idle, a head still coming getting
``PARTIAL_REQUEST_GRACE``; an HTTP/2 one gets a GOAWAY, the streams its
client opens after it are refused, and it closes once its open streams are
sent. :func:`_half_closing_channel` is what the target builds.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from zope.interface import implementer

from muxtwist._twisted import (
    default_reactor,
    generic_http_channel_base,
    http_channel_busy,
    http_head_coming,
    http_inner_channel,
)
from muxtwist.apps._http import PARTIAL_REQUEST_GRACE, REQUEST_TIMEOUT_RESPONSE, HeadDeadline
from muxtwist.apps._wsgi_pacing import _H2Pacer

__all__: list[str] = []

log = Logger(namespace="muxtwist.apps")


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

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._head_deadline = HeadDeadline()

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)  # type: ignore[no-untyped-call]
        if self.header_timeout is not None:
            self._watch_head(self.header_timeout)

    def _watch_head(self, timeout: float) -> None:
        if not http_head_coming(self):
            self._head_deadline.stop()
        elif self.transport is not None:
            self._head_deadline.start(self.callLater, timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
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
        self._head_deadline.stop()
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
    inner = _HalfClosingChannel()
    inner.header_timeout = getattr(site, "header_timeout", None)
    channel = _HalfClosingGenericChannel(inner)
    channels = getattr(site, "_channels", None)
    if channels is not None:
        # The outer channel: it stays the connection's protocol when HTTP/2 replaces the HTTP/1.1 one.
        channels.add(channel)
    return channel
