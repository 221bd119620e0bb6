"""
The sniffer's factory and the facade of the sniffer.

:class:`SniffingFactory` holds what every connection of a listener shares:
the rules (and ``set_rules`` to replace them), the connection limits, the
inner factories it starts and stops (:mod:`muxtwist._inner`), and the
registry of live connections (``connections``, ``when_idle``, aborting
them on a stop). Each connection is a
:class:`~muxtwist.sniffing.SniffingProtocol` (:mod:`muxtwist._sniffing_protocol`);
its end is reported by :mod:`muxtwist._sniffing_end`.

This module also names what users import of the sniffer: :class:`Rule`,
:class:`Outcome`, :class:`RuleStats` and the rule-name checks
(:mod:`muxtwist._rules`), and :func:`max_matcher_work`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IProtocolFactory, IReactorTime
from zope.interface import implementer

from muxtwist._deadlines import Deadlines
from muxtwist._inner import InnerFactories, RuleSet, unique
from muxtwist._limits import PerSource, Refusals, host_of
from muxtwist._report import Observers
from muxtwist._rules import (
    RESERVED_NAMES,
    Outcome,
    Rule,
    RuleStats,
    check_unique_names,
    duplicate_names,
    waits_for_bytes,
)
from muxtwist._sniffing_end import refused_at_accept
from muxtwist._sniffing_protocol import (
    EAGER_BYTES,
    EAGER_EVALUATIONS,
    QUIET_BUDGET,
    QUIET_DELAY,
    SniffingProtocol,
    max_matcher_work,
)
from muxtwist._twisted import default_reactor
from muxtwist.interfaces import ConnectionInfo, IConnectionInfoFactory, IRetiringFactory
from muxtwist.proxyprotocol import Trust

if TYPE_CHECKING:
    from muxtwist.metrics import Metrics

__all__ = [
    "EAGER_BYTES",
    "EAGER_EVALUATIONS",
    "QUIET_BUDGET",
    "QUIET_DELAY",
    "RESERVED_NAMES",
    "Outcome",
    "Rule",
    "RuleStats",
    "SniffingFactory",
    "SniffingProtocol",
    "check_unique_names",
    "duplicate_names",
    "max_matcher_work",
]

# Named where users import it from, as before the sniffer was split: the API
# reference documents it once, under that name.
SniffingProtocol.__module__ = __name__


@implementer(IConnectionInfoFactory, IRetiringFactory)
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
        (the metrics count every connection either way; written to a text
        log, the event costs a short connection more than its sniffing and
        handoff).
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
        self._ruleset = RuleSet(
            self.rules,
            on_timeout,
            on_no_match,
            tuple(factories),
            waits=waits_for_bytes(self.rules),
            # Every winner, fallbacks included, a Proxy (a fallback of None closes).
            relays_only=bool(factories) and all(getattr(f, "relays_connections", False) for f in factories),
        )
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
        at once if no connection uses it, or when its last connection ends;
        and log the refusals not logged yet.
        """
        if self._started == 0:
            return
        self._started -= 1
        if not self._started:
            self._inner.retire_all()
            self._stop_retired()
            self._refusals.flush()

    def retiring(self) -> None:
        """
        Nested (a rule's factory, or behind ``TerminateTLS``), the rules
        around this sniffer no longer name it: tell the factories of its own
        rules and fallbacks, each once, so that a WSGI or ASGI target behind
        it closes its idle keep-alive connections as one named directly
        does. They serve on until this sniffer's ``doStop``, which does not
        tell them again. A connection still sniffing here now tells its
        winner again once handed to it (:meth:`SniffingProtocol._hand_off`);
        those that come later, if the rules around name this sniffer again,
        do not.
        """
        for ruleset in self._old_rulesets:
            ruleset.retired = True
        if self._ruleset.sniffing:
            self._ruleset.retired = True
            self._old_rulesets.append(self._ruleset)
            self._ruleset = attrs.evolve(self._ruleset, sniffing=0, retired=False)
        self._inner.tell_running()

    def buildProtocol(self, addr: IAddress) -> SniffingProtocol | None:
        return self.buildProtocolForConnection(addr, None, "")

    def buildProtocolForConnection(
        self, addr: IAddress, info: ConnectionInfo | None, rule_name: str
    ) -> SniffingProtocol | None:
        """Build a sniffer; ``info`` comes from an outer sniffer when this one is nested."""
        if self.max_connections is not None and len(self.connections) >= self.max_connections:
            self._refused(addr, "max_connections", self.max_connections)
            refused_at_accept(self, addr, info)
            return None
        source = None
        limit = self.max_connections_per_source
        # A trusted PROXY peer (a balancer) is counted once its header says
        # whose connection this is (SniffingProtocol._read_proxy_header).
        if limit is not None and (self._trusted is None or not self._trusted.trusts(info.peer if info else addr)):
            source = host_of(info.source if info is not None else addr)
            if not self._take_source(source):
                self._refused(addr, "max_connections_per_source", limit)
                refused_at_accept(self, addr, info)
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
