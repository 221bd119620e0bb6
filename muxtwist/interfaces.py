"""
The contracts: verdicts, matchers, matcher plugins and the connection snapshot.

A matcher is a pure function of ``(data, info)``: it never does I/O, never
reads a clock and keeps no state between calls, so the same bytes always get
the same verdict and a fuzzer can call it a million times.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory
from twisted.plugin import IPlugin
from zope.interface import Attribute, Interface

__all__ = [
    "BackendState",
    "ConnectionEnd",
    "ConnectionInfo",
    "IBackendPool",
    "IConnectionObserver",
    "IConnectionInfoFactory",
    "IConnectionReport",
    "IMatcher",
    "IMatcherPlugin",
    "IRespondingMatcher",
    "IRetiringFactory",
    "RelayState",
    "Verdict",
]


class Verdict(enum.Enum):
    """What a matcher says about the bytes buffered so far."""

    MATCH = "match"
    NO_MATCH = "no_match"
    NEED_MORE = "need_more"


@attrs.frozen
class ConnectionInfo:
    """
    A snapshot of what is known about a connection, shown to every matcher.

    :ivar peer: the address of the connecting client, as the transport sees it.
    :ivar local: our own address on this connection.
    :ivar proxy_source: the client address carried by an accepted PROXY
        protocol header, or ``None``.
    :ivar proxy_destination: the destination carried by that header, or ``None``.
    :ivar sni: inside TLS termination, the server name the client asked for.
    :ivar alpn: inside TLS termination, the negotiated ALPN protocol.
    :ivar peer_certificate: inside TLS termination with client certificates,
        the verified client certificate (a ``cryptography`` certificate).
    """

    peer: IAddress | None = None
    local: IAddress | None = None
    proxy_source: IAddress | None = None
    proxy_destination: IAddress | None = None
    sni: str | None = None
    alpn: str | None = None
    peer_certificate: Any = None

    @property
    def source(self) -> IAddress | None:
        """The client as rules, logs and backends should see it: the PROXY source when there is one."""
        return self.proxy_source if self.proxy_source is not None else self.peer

    def evolve(self, **changes: Any) -> ConnectionInfo:
        """A copy with some fields changed."""
        return attrs.evolve(self, **changes)


class IMatcher(Interface):
    """Decides, from the first bytes of a connection, whether it speaks a protocol."""

    name = Attribute("A short lower-case label for logs and metrics: 'tls', 'http1', ...")

    def match(data: bytes, info: ConnectionInfo) -> Verdict:
        """
        Look at everything buffered so far.

        Must never raise, and must be monotonic: once a prefix of the stream
        gets MATCH or NO_MATCH, every longer prefix gets the same verdict.
        """


class IRespondingMatcher(IMatcher):
    """
    A matcher that must answer the client before it can decide.

    gRPC clients wait for the server's HTTP/2 SETTINGS before they send the
    request headers a matcher needs to see. Such a matcher declares the bytes
    to write; the sniffer writes them at most once per connection, and never
    writes anything else.
    """

    def respond(data: bytes, info: ConnectionInfo) -> bytes:
        """
        Bytes to write now, given that this matcher said NEED_MORE on ``data``
        and its rule decides; ``b""`` for nothing yet.
        """

    def filter_replay(data: bytes) -> bytes:
        """
        Remove from the buffer what the client sent only in answer to our
        declared bytes (the ACK of our SETTINGS), before it is replayed to
        the winning protocol, which never sent them.

        Once the declared bytes are written, the sniffer takes a buffer this
        leaves unchanged as one the answer has not reached yet: it holds the
        hand-off back until the answer is in (a client may send its opener
        before our bytes reach it, and answer after it), or until the final
        evaluation (``sniff_timeout``, ``max_sniff_bytes``, end of stream).
        """


class IConnectionInfoFactory(IProtocolFactory):
    """
    A factory that wants the sniffer's :class:`ConnectionInfo` of the
    connection it is given: the PROXY source, the SNI, the rule that won.

    The sniffer calls ``buildProtocolForConnection`` instead of
    ``buildProtocol`` on factories that provide this.
    """

    def buildProtocolForConnection(addr: IAddress, info: ConnectionInfo, rule_name: str) -> IProtocol | None:
        """Build the protocol for a connection whose sniffing ended with ``rule_name``."""


class IRetiringFactory(IProtocolFactory):
    """
    A factory that wants to know when the rules stop naming it (a reload
    left it out, or its listener is closing), before its ``doStop``.

    Connections already handed to it go on, and ``doStop`` waits for the
    last of them; meanwhile the factory may close those that are idle, such
    as HTTP keep-alive connections waiting for a next request, which would
    otherwise keep it (and its threads) until their own timeout.
    """

    def retiring() -> None:
        """
        No new connection will be handed to this factory unless later rules
        name it again. Called once each time it stops being named, and again
        right after each connection that was still being sniffed then is
        handed to it (its bytes replayed), so that it finishes that one too;
        it must not raise (an exception is logged and ignored).
        """


class IConnectionReport(Interface):
    """
    A handed-off protocol that can say more about its connection than the
    sniffer sees (which is nothing after the handoff): the sniffer reads
    these when the connection ends, for its log event and metrics.
    Optional; :class:`muxtwist.proxy.Relay` provides it.
    """

    bytes_in = Attribute("Bytes moved from the client onwards.")
    bytes_out = Attribute("Bytes moved back to the client.")
    backend_failed = Attribute("True if the connection ended because no backend could take it.")
    transparent = Attribute("True if the backend connection was made from the client's own address.")


@attrs.frozen
class ConnectionEnd:
    """
    What is known about a connection when it ends: what the sniffer tells
    each :class:`IConnectionObserver`.

    :ivar rule: the rule that got the connection, ``"on_timeout"``,
        ``"on_no_match"``, or ``"-"`` when it ended before any did.
    :ivar outcome: how sniffing ended (a :data:`muxtwist.metrics.OUTCOMES` value).
    :ivar sniff_time: seconds from accept to the rules' decision (to the end,
        for a connection that ended while sniffing).
    :ivar sniffed_in: bytes read from the client while sniffing.
    :ivar sniffed_out: bytes written to it by responding matchers.
    :ivar relayed_in: bytes the handed-off protocol moved from the client
        onwards, when it reports them (:class:`IConnectionReport`), else ``None``.
    :ivar relayed_out: bytes it moved back to the client, or ``None``.
    :ivar transparent: the backend connection came from the client's own address.
    :ivar peer: the client as logs show it (the PROXY source when there is one).
    :ivar local_port: our port the client connected to, when known.
    :ivar duration: seconds from accept to the end.
    """

    rule: str
    outcome: str
    sniff_time: float
    sniffed_in: int
    sniffed_out: int
    relayed_in: int | None = None
    relayed_out: int | None = None
    transparent: bool = False
    peer: str = ""
    local_port: int | None = None
    duration: float = 0.0


class IConnectionObserver(Interface):
    """
    Told how each connection ended and which limits refused connections:
    metrics (:class:`muxtwist.metrics.Metrics`) and the ``connection_end``
    log (:class:`muxtwist._report.ConnectionLog`) are observers.

    Called once per connection, on the reactor thread; must not raise.
    """

    def connection_end(end: ConnectionEnd) -> None:
        """A connection has ended."""

    def limit_rejected(limit: str) -> None:
        """A connection was closed at once because ``limit`` was reached."""


@attrs.frozen
class BackendState:
    """
    A snapshot of one backend of an :class:`IBackendPool`, read at scrape time.

    :ivar description: the backend's endpoint description, as metrics label it.
    :ivar usable: new connections may go to it now (health checks pass, not
        skipped after failures).
    :ivar active: relays open to it now.
    :ivar total: relays ever opened to it.
    :ivar transparent: of those, relays opened from the client's own address.
    :ivar failures: connect failures and mid-stream resets.
    :ivar errors: ``failures`` by kind (refused, timeout, reset, tls, error).
    :ivar bytes_in: bytes relayed from clients to it by relays that have
        ended (:meth:`IBackendPool.open_relays` has those still open).
    :ivar bytes_out: bytes relayed from it to clients by relays that have ended.
    :ivar checked: an active health check runs against it.
    :ivar healthy: what the active health check says (``True`` without one).
    :ivar since: when ``healthy`` took its current value (reactor seconds;
        ``None`` before the first check).
    :ivar last_check: the last active check's result: ``"passed"`` or why it failed.
    :ivar last_check_at: when it ran (reactor seconds).
    :ivar skipped_until: until when passive health keeps new connections
        away after failed connects (reactor seconds), or ``None``.
    """

    description: str
    usable: bool
    active: int
    total: int
    transparent: int
    failures: int
    errors: Mapping[str, int]
    bytes_in: int = 0
    bytes_out: int = 0
    checked: bool = False
    healthy: bool = True
    since: float | None = None
    last_check: str | None = None
    last_check_at: float | None = None
    skipped_until: float | None = None


@attrs.frozen
class RelayState:
    """
    A snapshot of one relay of an :class:`IBackendPool` that is connected to
    a backend now, so that numbers grow while a long transfer runs.

    :ivar rule: the name of the rule the relay was built for.
    :ivar backend: the backend's description, as its :class:`BackendState` gives it.
    :ivar bytes_in: bytes relayed from the client so far.
    :ivar bytes_out: bytes relayed back to the client so far.
    """

    rule: str
    backend: str
    bytes_in: int
    bytes_out: int


class IBackendPool(Interface):
    """
    A factory that relays connections to a set of backends
    (:class:`muxtwist.proxy.Proxy`): what metrics and status pages read.
    """

    gave_up = Attribute("Connections closed because no backend could take them.")
    transparent = Attribute("True if backend connections are made from the client's own address.")

    def backend_states() -> Sequence[BackendState]:
        """One :class:`BackendState` per backend, in configuration order."""

    def open_relays() -> Sequence[RelayState]:
        """One :class:`RelayState` per relay connected to a backend now."""


class IMatcherPlugin(IPlugin):
    """
    A named way to build a matcher, found with ``twisted.plugin.getPlugins``.

    Ship one by putting a module that holds a provider of this interface in
    your own ``twisted/plugins/`` directory.
    """

    name = Attribute("The name :func:`muxtwist.matchers.plugin` looks it up by.")

    def build(**options: Any) -> IMatcher:
        """Build a matcher with these options."""
