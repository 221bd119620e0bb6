"""
The admin site's ``Site``: at most so many connections open at once, so
that clients holding connections (idle ones, or a request sent a byte at a
time) cannot use up the descriptors of the process serving it, which under
``--workers`` is the parent that starts the workers again.

When it holds that many, a new connection takes the place of the one idle
the longest (no byte of a request received since its last answer, or since
it connected), as nginx and HAProxy free idle keep-alive connections; else
of the oldest one still sending its request after ``SLOW_REQUEST`` seconds
(a client sending a byte at a time resets twisted.web's idle timeout with
every byte). A connection whose request is being answered is never closed
for room; with no connection to close, the new one is.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Site

from muxtwist._limits import address_text
from muxtwist._options import shown
from muxtwist._text import LogThrottle
from muxtwist._twisted import default_reactor, generic_http_channel_base, http_channel_busy, http_inner_channel

__all__ = ["MAX_CONNECTIONS", "SLOW_REQUEST", "AdminSite"]

log = Logger(namespace="muxtwist.admin")

#: Connections the admin site holds open at once by default.
MAX_CONNECTIONS = 128

#: Seconds after which a connection still sending its request may be closed
#: to make room (curl, Prometheus and browsers send a request at once).
SLOW_REQUEST = 10.0


class _Channel(HTTPChannel):
    """The HTTP/1.1 channel of one admin connection: tells the site when it has answered every request."""

    connection: _Connection

    def dataReceived(self, data: bytes) -> None:
        # Also the pipelined bytes the channel replays once it has answered.
        if data:
            self.connection.site_of.receiving(self.connection)
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def requestDone(self, request: Any) -> None:
        if self.persistent and len(self.requests) == 1:
            # Idle before the pipelined bytes (if any) are replayed, which make it busy again.
            self.connection.site_of.idle(self.connection)
        super().requestDone(request)  # type: ignore[no-untyped-call]


class _Connection(generic_http_channel_base()):  # type: ignore[misc]
    """Site's protocol for one admin connection (HTTP/1.1, or HTTP/2 once ALPN chose it)."""

    def __init__(self, site: AdminSite, channel: _Channel) -> None:
        super().__init__(channel)
        channel.connection = self
        self.site_of = site
        self.peer: IAddress | None = None

    def dataReceived(self, data: bytes) -> None:
        # Here too: an HTTP/2 connection's bytes never reach the HTTP/1.1 channel.
        if data:
            self.site_of.receiving(self)
        super().dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        self.site_of.gone(self)
        super().connectionLost(reason)

    def close_for_room(self) -> None:
        """Close at once, so that its descriptor is free for the connection taking its place."""
        transport = getattr(http_inner_channel(self), "transport", None)
        if transport is not None:
            getattr(transport, "abortConnection", transport.loseConnection)()


def _connection(site: AdminSite) -> _Connection:
    """What ``AdminSite.buildProtocol`` builds (called as a method of the site, as Twisted's own default is)."""
    return _Connection(site, _Channel())  # type: ignore[no-untyped-call]


class AdminSite(Site):
    """
    A ``Site`` holding at most ``max_connections`` open: past it, a new
    connection takes the place of an idle one or of one sending its request
    too slowly, or is closed at once if there is none (logged at most once a
    second, with the count of those not logged).
    """

    protocol = _connection

    def __init__(self, resource: IResource, *, max_connections: int = MAX_CONNECTIONS, reactor: Any = None) -> None:
        if not isinstance(max_connections, int) or isinstance(max_connections, bool) or max_connections < 1:
            raise ValueError(f"admin max_connections must be a positive integer, got {shown(max_connections)}")
        reactor = default_reactor(reactor)
        super().__init__(resource, reactor=reactor)  # type: ignore[no-untyped-call]
        self.max_connections = max_connections
        self._clock = reactor
        self._throttle = LogThrottle(reactor)
        self._open: set[_Connection] = set()
        #: Idle connections, the one idle the longest first, with the time each became idle.
        self._idle: dict[_Connection, float] = {}
        #: Connections with a request in progress, the one that began first first, with the time it began.
        self._busy: dict[_Connection, float] = {}

    @property
    def open_connections(self) -> int:
        """Connections open now."""
        return len(self._open)

    @property
    def idle_connections(self) -> int:
        """Connections open now with no request in progress."""
        return len(self._idle)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if len(self._open) >= self.max_connections and not self._make_room():
            suppressed = self._throttle.admit("full")
            if suppressed is not None:
                log.warn(
                    "admin: closed a connection from {peer}: {open} open, the most the admin site holds,"
                    " none idle or slow ({suppressed} more closed since the last line)",
                    peer=address_text(addr),
                    open=len(self._open),
                    suppressed=suppressed,
                )
            return None
        connection: _Connection | None = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        if connection is None:
            return None
        connection.peer = addr
        self._open.add(connection)
        self._idle[connection] = self._clock.seconds()
        return connection

    def _make_room(self) -> bool:
        """Close the connection idle the longest, or else the oldest too slow to send its request; whether one was."""
        now = self._clock.seconds()
        victim, why = next(iter(self._idle.items()), (None, 0.0)), "idle"
        if victim[0] is None:
            why = "still sending its request"
            victim = next(
                (
                    (connection, began)
                    for connection, began in self._busy.items()
                    if now - began >= SLOW_REQUEST and self._receiving_request(connection)
                ),
                (None, 0.0),
            )
        connection, since = victim
        if connection is None:
            return False
        self.gone(connection)
        connection.close_for_room()
        suppressed = self._throttle.admit("room")
        if suppressed is not None:
            log.info(
                "admin: closed the connection from {peer}, {why} for {seconds:.1f}s, to make room for a new one"
                " ({open} open, the most the admin site holds; {suppressed} more closed since the last line)",
                peer=address_text(connection.peer),
                why=why,
                seconds=now - since,
                open=self.max_connections,
                suppressed=suppressed,
            )
        return True

    @staticmethod
    def _receiving_request(connection: _Connection) -> bool:
        """Whether an HTTP/1.1 connection's request is still arriving (not being answered)."""
        channel = http_inner_channel(connection)
        return isinstance(channel, _Channel) and not http_channel_busy(channel)

    def receiving(self, connection: _Connection) -> None:
        """``connection`` received bytes of a request: it is busy until it has answered them."""
        if self._idle.pop(connection, None) is not None:
            self._busy[connection] = self._clock.seconds()

    def idle(self, connection: _Connection) -> None:
        """``connection`` answered every request it received."""
        if connection in self._open:
            self._busy.pop(connection, None)
            self._idle.pop(connection, None)
            self._idle[connection] = self._clock.seconds()

    def gone(self, connection: _Connection) -> None:
        """``connection`` ended, or is being closed to make room."""
        self._open.discard(connection)
        self._idle.pop(connection, None)
        self._busy.pop(connection, None)
