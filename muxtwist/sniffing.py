"""
The sniffer: buffer a connection's first bytes, show them to the rules in
order, and hand the connection, bytes replayed, to the winner's factory.

After the handoff the winning protocol is put in the sniffer's place on the
transport (``transport.protocol`` of a TCP or UNIX connection,
``transport.wrappedProtocol`` of a TLS or other wrapping transport), so it
receives data straight from the transport and the sniffer costs nothing per
byte. The end of the connection is learned from the transport, whose
``connectionLost`` tells the sniffer after Twisted's own has run
(:func:`muxtwist._twisted.after_connection_lost`); the winner's object is
never changed. Only on a transport that has neither attribute, or that
cannot tell its end so (in-memory transports), does the sniffer stay in
between and pass each chunk on with one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    ITransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from muxtwist._deadlines import Deadline, Deadlines
from muxtwist._inner import InnerFactories, RuleSet, unique
from muxtwist._limits import PerSource, Refusals, address_text, host_of
from muxtwist._prestage import ProxyPreStage
from muxtwist._report import ConnectionLog, Observers
from muxtwist._rules import RESERVED_NAMES, Outcome, Rule, RuleStats, check_unique_names, duplicate_names
from muxtwist._text import printable
from muxtwist._twisted import after_connection_lost, default_reactor
from muxtwist.interfaces import (
    ConnectionEnd,
    ConnectionInfo,
    IConnectionInfoFactory,
    IConnectionReport,
    IMatcher,
    IRespondingMatcher,
    Verdict,
)
from muxtwist.proxyprotocol import ProxyHeaderReader, Trust

if TYPE_CHECKING:
    from muxtwist.metrics import Metrics

__all__ = [
    "RESERVED_NAMES",
    "Outcome",
    "Rule",
    "RuleStats",
    "SniffingFactory",
    "check_unique_names",
    "duplicate_names",
    "max_matcher_work",
]

log = Logger()

#: The ``connection_end`` event, for factories with ``log_connections``.
_CONNECTION_LOG = ConnectionLog()

# When the rules see the buffer. The matcher work of one connection is
# bounded by a constant times max_sniff_bytes, whatever the client's timing
# and sniff_timeout (max_matcher_work gives the bound):
#
# - eagerly: while the buffer holds at most EAGER_BYTES, each chunk is
#   evaluated at once, for the first EAGER_EVALUATIONS evaluations (the usual
#   opener arrives whole in the first chunk and is decided there);
# - on growth: a chunk that grows the buffer by a quarter since the last
#   evaluation is evaluated at once; these sizes grow geometrically, so they
#   sum to less than 5 * max_sniff_bytes;
# - on a pause: bytes held back are evaluated once the client has sent
#   nothing for QUIET_DELAY (the timer re-arms itself until there really is
#   such a pause), while the scans these cost stay within QUIET_BUDGET *
#   max_sniff_bytes; past that budget, only growth and the final evaluation
#   remain;
# - finally, once: max_sniff_bytes reached, end of stream, or sniff_timeout.
EAGER_BYTES = 1024
EAGER_EVALUATIONS = 32
QUIET_DELAY = 0.02
QUIET_BUDGET = 4


def max_matcher_work(max_sniff_bytes: int) -> int:
    """
    The most bytes one matcher is shown over one connection's sniffing:
    ``EAGER_EVALUATIONS * min(EAGER_BYTES, max_sniff_bytes)`` for the eager
    evaluations, ``5 * max_sniff_bytes`` for those on growth,
    ``QUIET_BUDGET * max_sniff_bytes`` for those after a pause, and
    ``max_sniff_bytes`` for the final one (12 * 16 KiB at the defaults).
    """
    eager = EAGER_EVALUATIONS * min(EAGER_BYTES, max_sniff_bytes)
    return eager + (5 + QUIET_BUDGET + 1) * max_sniff_bytes


@implementer(IConnectionInfoFactory)
class SniffingFactory:
    """
    A factory whose connections are sniffed and handed to the first rule that
    matches; see DESIGN.md, "Sniffing semantics", for the exact rules.

    :param rules: the :class:`Rule` list, in priority order.
    :param sniff_timeout: seconds to wait for the rules to decide.
    :param max_sniff_bytes: the most bytes buffered before deciding anyway.
    :param on_timeout: the factory for clients that send nothing within
        ``sniff_timeout`` (server-speaks-first protocols); default: close.
    :param on_no_match: the factory for clients no rule matches; default: close.
    :param max_connections: connections above this are closed at once.
    :param max_connections_per_source: connections from one source host
        (the PROXY source once a header is accepted) above this are closed.
    :param accept_proxy_protocol: peers trusted to send a PROXY protocol
        header before their data: CIDRs, and ``"unix"`` for every peer of a
        UNIX-socket listener. A trusted peer must send a header; its
        connection counts towards ``max_connections_per_source`` only once
        the header is read, as the header's source.
    :param metrics: the :class:`~muxtwist.metrics.Metrics` to count into,
        which then also read this factory's live numbers; none by default
        (a :class:`~muxtwist.service.MuxService` serving it gives it its own).
    :param log_connections: emit one log event per connection when it ends
        (the metrics count every connection either way; turning the event
        off saves a few microseconds per connection).
    :param reactor: the reactor for timers (``twisted.internet.reactor`` by default).
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        *,
        sniff_timeout: float = 5.0,
        max_sniff_bytes: int = 16384,
        on_timeout: IProtocolFactory | None = None,
        on_no_match: IProtocolFactory | None = None,
        max_connections: int | None = None,
        max_connections_per_source: int | None = None,
        accept_proxy_protocol: Sequence[str] | None = None,
        metrics: Metrics | None = None,
        log_connections: bool = True,
        reactor: IReactorTime | None = None,
    ) -> None:
        reactor = default_reactor(reactor)
        self._reactor: IReactorTime = reactor
        self.sniff_timeout = sniff_timeout
        self.max_sniff_bytes = max_sniff_bytes
        self.max_connections = max_connections
        self.max_connections_per_source = max_connections_per_source
        self.log_connections = log_connections
        self._sources = PerSource()
        # Counted where the caller says: the Metrics given here (which then
        # read this factory's live numbers too), or those of the MuxService
        # serving it. Built alone, it is counted and read by nothing.
        self.metrics: Metrics | Observers = Observers() if metrics is None else metrics
        if metrics is not None:
            metrics.track(self)
        self._trusted: Trust | None = None
        self.accept_proxy_protocol = accept_proxy_protocol
        self._refusals = Refusals(reactor)
        # Every sniffing connection's sniff_timeout, behind one DelayedCall.
        self._deadlines: Deadlines | None = None
        self._started = 0
        self._inner = InnerFactories()
        self._ruleset = RuleSet((), None, None, ())
        self._old_rulesets: list[RuleSet] = []
        self.connections: set[SniffingProtocol] = set()
        self._idle: list[defer.Deferred[None]] = []
        self.stats: dict[str, RuleStats] = {}
        self.rules: tuple[Rule, ...] = ()
        self.on_timeout = on_timeout
        self.on_no_match = on_no_match
        self.set_rules(rules, on_timeout=on_timeout, on_no_match=on_no_match)

    def __repr__(self) -> str:
        return f"<SniffingFactory rules={[r.name for r in self.rules]}>"

    @property
    def accept_proxy_protocol(self) -> tuple[str, ...] | None:
        """The trusted PROXY peers as given (CIDRs and ``"unix"``), or ``None``."""
        return self._accept_proxy_protocol

    @accept_proxy_protocol.setter
    def accept_proxy_protocol(self, entries: Sequence[str] | None) -> None:
        self._trusted = None if entries is None else Trust.parse(entries)
        self._accept_proxy_protocol = None if entries is None else tuple(entries)

    def set_rules(
        self,
        rules: Sequence[Rule],
        *,
        on_timeout: IProtocolFactory | None = None,
        on_no_match: IProtocolFactory | None = None,
    ) -> None:
        """
        Use these rules for new connections; connections already sniffing or
        handed off keep what they had. Factories that come in are started,
        factories that go out are stopped, when this factory is running.
        """
        for r in rules:
            if not isinstance(r, Rule):
                raise TypeError(f"rules must be Rule instances, got {r!r}")
        check_unique_names(rules)
        for what, f in (("on_timeout", on_timeout), ("on_no_match", on_no_match)):
            if f is not None and not IProtocolFactory.providedBy(f):
                raise TypeError(f"{what} must be an IProtocolFactory, got {f!r}")
        self.rules = tuple(rules)
        self.on_timeout = on_timeout
        self.on_no_match = on_no_match
        for name in [r.name for r in self.rules] + ["on_timeout", "on_no_match"]:
            self.stats.setdefault(name, RuleStats())
        if self._ruleset.sniffing:
            self._old_rulesets.append(self._ruleset)
        factories = unique([r.factory for r in self.rules] + [on_timeout, on_no_match])
        self._ruleset = RuleSet(self.rules, on_timeout, on_no_match, tuple(factories))
        if self._started:
            self._start_inner()

    @property
    def _per_source(self) -> dict[str, int]:
        """Live connections per source host (``max_connections_per_source``)."""
        return self._sources.counts

    def _start_inner(self) -> None:
        """Start the wanted inner factories not running yet; retire the others."""
        self._inner.start(self._ruleset.factories)
        self._stop_retired()

    def _stop_retired(self) -> None:
        """
        Stop each retiring factory that nothing can use any more: no live
        connection was handed to it, and no connection still sniffing under
        rules that name it.
        """
        if not self._inner.retiring:
            return
        self._old_rulesets = [s for s in self._old_rulesets if s.sniffing]
        sniffing = [*self._old_rulesets, self._ruleset] if self._ruleset.sniffing else self._old_rulesets
        self._inner.stop_unused(sniffing)

    def _use(self, f: IProtocolFactory) -> None:
        """A connection was handed to ``f``."""
        self._inner.use(f)

    def _release(self, f: IProtocolFactory) -> None:
        """A connection handed to ``f`` ended."""
        if self._inner.release(f):
            self._stop_retired()

    # IProtocolFactory

    def doStart(self) -> None:
        """Start the inner factories, once, when the first port starts using us."""
        if not self._started:
            self._start_inner()
        self._started += 1

    def doStop(self) -> None:
        """
        When the last port stops using us, stop the inner factories: each
        at once if no connection uses it, or when its last connection ends.
        """
        if self._started == 0:
            return
        self._started -= 1
        if not self._started:
            self._inner.retire_all()
            self._stop_retired()

    def buildProtocol(self, addr: IAddress) -> SniffingProtocol | None:
        return self.buildProtocolForConnection(addr, None, "")

    def buildProtocolForConnection(
        self, addr: IAddress, info: ConnectionInfo | None, rule_name: str
    ) -> SniffingProtocol | None:
        """Build a sniffer; ``info`` comes from an outer sniffer when this one is nested."""
        if self.max_connections is not None and len(self.connections) >= self.max_connections:
            self._refused(addr, "max_connections", self.max_connections)
            return None
        source = None
        limit = self.max_connections_per_source
        # A trusted PROXY peer (a balancer) is counted once its header says
        # whose connection this is (SniffingProtocol._read_proxy_header).
        if limit is not None and (self._trusted is None or not self._trusted.trusts(info.peer if info else addr)):
            source = host_of(info.source if info is not None else addr)
            if not self._take_source(source):
                self._refused(addr, "max_connections_per_source", limit)
                return None
        p = SniffingProtocol(self, addr, info)
        p._source = source
        return p

    def _refused(self, peer: object, limit: str, value: int, rule: str = "") -> None:
        """Count a refusal by ``limit``; log it, at most once a second per limit (and rule)."""
        self._refusals.refused(self.metrics, peer, limit, value, rule)

    def _refused_header(self, peer: object, problem: str) -> None:
        """Log a connection refused by the PROXY pre-stage, at most once a second."""
        self._refusals.refused_header(peer, problem)

    def _take_source(self, source: str | None) -> bool:
        """Count one more connection from ``source``, unless it is at its limit."""
        return self._sources.take(source, self.max_connections_per_source)

    def _release_source(self, source: str) -> None:
        self._sources.release(source)

    # The connection registry

    def _add(self, p: SniffingProtocol) -> None:
        self.connections.add(p)

    def _remove(self, p: SniffingProtocol) -> None:
        self.connections.discard(p)
        if not self.connections and self._idle:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def when_idle(self) -> defer.Deferred[None]:
        """A Deferred that fires once this factory has no live connections."""
        if not self.connections:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        return d

    def abort_sniffing(self) -> None:
        """Abort every connection still sniffing (a stop in progress)."""
        for p in [p for p in self.connections if p.sniffing]:
            p.abort()

    def abort_all(self) -> None:
        """Abort every live connection, sniffing or handed off."""
        for p in list(self.connections):
            p.abort()


@implementer(IProtocol, IHalfCloseableProtocol)
class SniffingProtocol(ProxyPreStage):
    """
    One connection while it is being sniffed, and its record afterwards.

    Slotted: tens of thousands of these may sit waiting for their first byte.
    """

    factory: SniffingFactory

    __slots__ = (
        "_active",
        "_buffer",
        "_bytes_in",
        "_bytes_out",
        "_deadline",
        "_evaluations",
        "_handed_to",
        "_last_data",
        "_next_eval",
        "_quiet",
        "_quiet_left",
        "_read_closed",
        "_responder",
        "_ruleset",
        "addr",
        "ended_at",
        "factory",
        "outcome",
        "rule_name",
        "sniff_time",
        "started",
        "transport",
        "winner",
    )

    def __init__(self, factory: SniffingFactory, addr: IAddress, info: ConnectionInfo | None) -> None:
        self.factory = factory
        self.addr = addr
        self._info = info
        self._ruleset = factory._ruleset
        self.transport: ITransport | None = None
        self._buffer: bytearray | None = bytearray()
        self._overflow = b""
        self._deadline: Deadline | None = None
        self._quiet: IDelayedCall | None = None
        self._next_eval = 0
        self._evaluations = 0
        self._last_data = 0.0
        self._quiet_left = QUIET_BUDGET * factory.max_sniff_bytes
        self._handed_to: IProtocolFactory | None = None
        self._read_closed = False
        self._responder: IRespondingMatcher | None = None
        self._active: RuleStats | None = None
        self._proxy_reader: ProxyHeaderReader | None = None
        self._source: str | None = None
        self._bytes_in = 0
        self._bytes_out = 0
        self.winner: IProtocol | None = None
        self.rule_name = ""
        self.outcome: Outcome | None = None
        self.started = 0.0
        self.sniff_time: float | None = None
        self.ended_at: float | None = None

    def __repr__(self) -> str:
        state = "sniffing" if self.sniffing else f"{self.outcome and self.outcome.value}:{self.rule_name}"
        return f"<SniffingProtocol {self.addr} {state}>"

    @property
    def sniffing(self) -> bool:
        """Whether the rules have not decided yet."""
        return self.outcome is None

    @property
    def info(self) -> ConnectionInfo:
        """What the matchers see of this connection."""
        assert self._info is not None
        return self._info

    # IProtocol

    def makeConnection(self, transport: ITransport) -> None:
        self.transport = transport
        self.connectionMade()

    def connectionMade(self) -> None:
        factory = self.factory
        reactor = factory._reactor
        self.started = reactor.seconds()
        transport = self.transport
        assert transport is not None
        if self._info is None:
            self._info = ConnectionInfo(peer=transport.getPeer(), local=transport.getHost())
        factory._add(self)
        self._ruleset.sniffing += 1
        deadlines = factory._deadlines
        if deadlines is None or deadlines.delay != factory.sniff_timeout:
            # The first connection, or a reload changed sniff_timeout: one queue per length.
            deadlines = factory._deadlines = Deadlines(reactor, factory.sniff_timeout)
        self._deadline = deadlines.add(self._timed_out)
        if factory._trusted is not None:
            self._start_proxy_stage(self._info, factory._trusted)
        else:
            self._evaluate(final=None, data=b"")

    def dataReceived(self, data: bytes) -> None:
        if self.winner is not None:
            # Forwarding mode: a transport we could not swap the winner into.
            self.winner.dataReceived(data)
            return
        buffer = self._buffer
        if buffer is None:
            return
        if self._proxy_reader is not None:
            data = self._read_proxy_header(data)
            if not data or self._buffer is None:
                return
        room = self.factory.max_sniff_bytes - len(buffer)
        if len(data) >= room:
            # The cap: decide on exactly max_sniff_bytes. What this read
            # brought beyond it is not sniffed; the winner gets it after the
            # replay (the rest of the stream is still in the kernel).
            if len(data) > room:
                self._overflow = data[room:]
                data = data[:room]
            buffer += data
            self._evaluate(final=Outcome.NO_MATCH)
            return
        buffer += data
        size = len(buffer)
        if size >= self._next_eval:
            # The usual case: the whole opener in the first chunk, decided
            # here without copying the buffer again.
            self._evaluate(final=None, data=data if size == len(data) else None)
            return
        reactor = self.factory._reactor
        self._last_data = reactor.seconds()
        if self._quiet is None and size <= self._quiet_left:
            self._quiet = reactor.callLater(QUIET_DELAY, self._quiet_evaluate)

    def readConnectionLost(self) -> None:
        if self.winner is not None:
            if IHalfCloseableProtocol.providedBy(self.winner):
                self.winner.readConnectionLost()
            elif self.transport is not None:
                self.transport.loseConnection()
            return
        self._read_closed = True
        if self._buffer is not None and self._finish_proxy_stage("its end of stream"):
            self._evaluate(final=Outcome.NO_MATCH)

    def writeConnectionLost(self) -> None:
        if self.winner is not None and IHalfCloseableProtocol.providedBy(self.winner):
            self.winner.writeConnectionLost()

    def connectionLost(self, reason: Failure) -> None:
        if self.winner is not None:
            winner, self.winner = self.winner, None
            try:
                winner.connectionLost(reason)
            finally:
                self._ended(winner)
            return
        if self.sniffing:
            self._end_sniffing(Outcome.CLOSED, "")
        self._ended()

    # Deciding

    def _quiet_evaluate(self) -> None:
        self._quiet = None
        buffer = self._buffer
        if buffer is None:
            return
        reactor = self.factory._reactor
        idle = reactor.seconds() - self._last_data
        if idle < QUIET_DELAY - 1e-6:
            # Bytes came since the timer was armed: not a pause yet. (The
            # margin keeps a rounding error from re-arming it for no time.)
            self._quiet = reactor.callLater(QUIET_DELAY - idle, self._quiet_evaluate)
            return
        if len(buffer) <= self._quiet_left:
            self._quiet_left -= len(buffer)
            self._evaluate(final=None)

    def _timed_out(self) -> None:
        self._deadline = None
        if self._buffer is not None and self._finish_proxy_stage("the sniff timeout"):
            self._evaluate(final=Outcome.TIMEOUT)

    def _evaluate(self, final: Outcome | None, data: bytes | None = None) -> None:
        """
        Show the buffer (``data``, when the caller has it as bytes already)
        to the rules in order. ``final`` is None for an ordinary evaluation,
        or the reason this is the last one, in which NEED_MORE counts as
        NO_MATCH.
        """
        buffer = self._buffer
        assert buffer is not None
        if self._quiet is not None:
            self._quiet.cancel()
            self._quiet = None
        if data is None:
            data = bytes(buffer)
        size = len(data)
        self._evaluations += 1
        if size <= EAGER_BYTES and self._evaluations < EAGER_EVALUATIONS:
            self._next_eval = size + 1
        else:
            self._next_eval = size + (size >> 2) + 1
        info = self.info
        for rule in self._ruleset.rules:
            try:
                verdict = rule.matcher.match(data, info)
            except Exception:
                log.failure("matcher of rule {rule} raised; taken as NO_MATCH", rule=rule.name)
                continue
            if verdict is Verdict.MATCH:
                self._hand_off(rule.factory, rule.name, Outcome.HANDED_OFF, data, rule.max_connections)
                return
            if verdict is Verdict.NEED_MORE and final is None:
                self._respond(rule.matcher, data)
                return
        if final is Outcome.TIMEOUT and not data:
            self._hand_off(self._ruleset.on_timeout, "on_timeout", Outcome.TIMEOUT, data)
        elif final is not None or data:
            self._hand_off(self._ruleset.on_no_match, "on_no_match", Outcome.NO_MATCH, data)
        # else: no rule can tell from zero bytes; wait for the first ones.

    def _respond(self, matcher: IMatcher, data: bytes) -> None:
        if self._responder is not None or not IRespondingMatcher.providedBy(matcher):
            return
        try:
            out = matcher.respond(data, self.info)
        except Exception:
            log.failure("matcher {name} raised in respond()", name=matcher.name)
            return
        if out:
            self._responder = matcher
            self._bytes_out += len(out)
            assert self.transport is not None
            self.transport.write(out)

    def _end_sniffing(self, outcome: Outcome, rule_name: str) -> None:
        if self.transport is not None and self.outcome is None:
            ruleset = self._ruleset
            ruleset.sniffing -= 1
            if not ruleset.sniffing and self.factory._inner.retiring:
                self.factory._stop_retired()
        self.outcome = outcome
        self.rule_name = rule_name
        if self._buffer is not None:
            self._bytes_in = len(self._buffer)
        self._buffer = None
        self.sniff_time = self.factory._reactor.seconds() - self.started
        for call in (self._deadline, self._quiet):
            if call is not None and call.active():
                call.cancel()
        self._deadline = self._quiet = None
        if rule_name:
            self.factory.stats.setdefault(rule_name, RuleStats()).total += 1

    def _hand_off(
        self,
        factory: IProtocolFactory | None,
        rule_name: str,
        outcome: Outcome,
        data: bytes,
        limit: int | None = None,
    ) -> None:
        transport = self.transport
        assert transport is not None
        overflow, self._overflow = self._overflow, b""
        if factory is not None:
            # Counted before sniffing ends, so that a reload's retiring of
            # this factory waits for this connection.
            self._handed_to = factory
            self.factory._use(factory)
        self._end_sniffing(outcome, rule_name)
        if factory is None:
            self._close_unhandled(transport, rule_name)
            return
        if limit is not None and self.factory.stats[rule_name].active >= limit:
            self.factory._refused(self.info.source, "rule_max_connections", limit, rule_name)
            self.outcome = Outcome.REJECTED
            transport.loseConnection()
            return
        try:
            if IConnectionInfoFactory.providedBy(factory):
                proto = factory.buildProtocolForConnection(self.addr, self.info, rule_name)
            else:
                proto = factory.buildProtocol(self.addr)
        except Exception:
            log.failure("factory of rule {rule} raised in buildProtocol", rule=rule_name)
            proto = None
        if proto is None:
            self._close_unhandled(transport, rule_name)
            return
        if self._responder is not None:
            data = self._responder.filter_replay(data)
        self._attach(transport, proto)
        self._active = self.factory.stats[rule_name]
        self._active.active += 1
        proto.makeConnection(transport)
        if data and not _closing(transport):
            proto.dataReceived(data)
        if overflow and not _closing(transport):
            proto.dataReceived(overflow)
        if self._read_closed and not _closing(transport):
            if IHalfCloseableProtocol.providedBy(proto):
                proto.readConnectionLost()
            else:
                transport.loseConnection()

    def _close_unhandled(self, transport: ITransport, rule_name: str) -> None:
        if rule_name not in ("on_timeout", "on_no_match"):
            log.info(
                "{rule} declined {peer}: its factory built no protocol",
                rule=rule_name,
                peer=printable(address_text(self.addr)),
            )
            self.outcome = Outcome.REJECTED
        transport.loseConnection()

    def _attach(self, transport: ITransport, proto: IProtocol) -> None:
        """
        Put ``proto`` where the transport delivers data, and learn of the end
        from the transport (never from ``proto``, a user's object); on a
        transport that cannot tell (in-memory ones), stay in between.
        """
        for attribute in ("protocol", "wrappedProtocol"):
            if getattr(transport, attribute, None) is self:
                if after_connection_lost(transport, self, proto):
                    setattr(transport, attribute, proto)
                    return
                break
        self.winner = proto

    def _ended(self, winner: IProtocol | None = None) -> None:
        if self.ended_at is not None:
            return
        relayed_in = relayed_out = None
        transparent = False
        if winner is not None and IConnectionReport.providedBy(winner):
            report: Any = winner
            relayed_in, relayed_out = report.bytes_in, report.bytes_out
            transparent = bool(getattr(report, "transparent", False))
            if report.backend_failed:
                self.outcome = Outcome.BACKEND_FAILED
        factory = self.factory
        self.ended_at = factory._reactor.seconds()
        if self._active is not None:
            self._active.active -= 1
            self._active = None
        factory._remove(self)
        if self._source is not None:
            factory._release_source(self._source)
            self._source = None
        if self._handed_to is not None:
            handed_to, self._handed_to = self._handed_to, None
            factory._release(handed_to)
        outcome = self.outcome.value if self.outcome else Outcome.CLOSED.value
        rule = self.rule_name or "-"
        sniff_time = self.sniff_time if self.sniff_time is not None else self.ended_at - self.started
        info = self._info
        ended = factory.stats.get(rule) or factory.stats.setdefault(rule, RuleStats())
        ended.outcomes[outcome] = ended.outcomes.get(outcome, 0) + 1
        ended.bytes_in += self._bytes_in if relayed_in is None else relayed_in
        ended.bytes_out += self._bytes_out + (relayed_out or 0)
        end = ConnectionEnd(
            rule=rule,
            outcome=outcome,
            sniff_time=sniff_time,
            sniffed_in=self._bytes_in,
            sniffed_out=self._bytes_out,
            relayed_in=relayed_in,
            relayed_out=relayed_out,
            transparent=transparent,
            peer=address_text(info.source if info is not None else self.addr),
            local_port=getattr(info.local if info is not None else None, "port", None),
            duration=self.ended_at - self.started,
        )
        factory.metrics.connection_end(end)
        if factory.log_connections and factory._refusals.log_end(outcome, rule):
            _CONNECTION_LOG.connection_end(end)

    def abort(self) -> None:
        """Abort the connection at once (a stop's deadline, or a stop while sniffing)."""
        transport = self.transport
        if transport is None:
            return
        if self.sniffing:
            self._end_sniffing(Outcome.ABORTED, "")
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            transport.loseConnection()


def _closing(transport: ITransport) -> bool:
    """Whether the transport is closing or closed (then the winner gets no replay)."""
    return bool(
        getattr(transport, "disconnecting", False)
        or getattr(transport, "disconnected", False)
        or getattr(transport, "connected", True) is False
    )
