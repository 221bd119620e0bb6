"""
A sniffed connection's record (outcome, rule, times, bytes, what it was
handed to) and its end: what it held is given back (its place in
the factory's registry, its source's count, its inner factory and its
rule's live count), and what happened to it is reported, once, as one
:class:`~muxtwist.interfaces.ConnectionEnd` to the factory's observer and,
with ``log_connections``, to the ``connection_end`` log.

The end comes from the sniffer's own ``connectionLost`` while it is the
transport's protocol, and from the transport once the connection is handed
off (:func:`muxtwist._twisted.after_connection_lost`), with the winner, whose
relayed bytes are reported when it is an
:class:`~muxtwist.interfaces.IConnectionReport`.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IProtocol, IProtocolFactory, IReactorTime

from muxtwist._limits import Refusals, address_text
from muxtwist._prestage import PreStageOwner, ProxyPreStage
from muxtwist._report import ConnectionLog, Observers
from muxtwist._rules import Outcome, RuleStats
from muxtwist.interfaces import ConnectionEnd, ConnectionInfo, IConnectionObserver, IConnectionReport

__all__ = ["EndOfConnection", "EndOwner", "refused_at_accept"]

#: The ``connection_end`` event, for factories with ``log_connections``.
_CONNECTION_LOG = ConnectionLog()


class EndOwner(PreStageOwner, Protocol):
    """What the end of a connection reads of, and gives back to, the sniffing factory."""

    _reactor: IReactorTime
    stats: dict[str, RuleStats]
    log_connections: bool

    @property
    def metrics(self) -> IConnectionObserver: ...

    @property
    def _refusals(self) -> Refusals: ...

    def _remove(self, p: Any) -> None: ...

    def _release_source(self, source: str) -> None: ...

    def _release(self, f: IProtocolFactory) -> None: ...


def refused_at_accept(factory: EndOwner, addr: object, info: ConnectionInfo | None) -> None:
    """
    Report the end of a connection a listener limit refused before it was
    sniffed (the factory built no protocol for it): counted as ``rejected``
    with rule ``-``, as one the PROXY pre-stage refuses, so that every
    accepted connection ends once in the metrics. Its ``connection_end``
    line is left out: the limit's own refusal line, throttled, stands for it.
    """
    outcome = Outcome.REJECTED.value
    ended = factory.stats.get("-") or factory.stats.setdefault("-", RuleStats())
    ended.outcomes[outcome] = ended.outcomes.get(outcome, 0) + 1
    observer = factory.metrics
    if isinstance(observer, Observers) and not observer.observers:
        return
    observer.connection_end(
        ConnectionEnd(
            rule="-",
            outcome=outcome,
            sniff_time=0.0,
            sniffed_in=0,
            sniffed_out=0,
            peer=address_text(info.source if info is not None else addr),
            local_port=getattr(info.local if info is not None else None, "port", None),
            duration=0.0,
        )
    )


class EndOfConnection(ProxyPreStage):
    """
    A connection's record (how sniffing ended, for which rule, when, the
    bytes it moved, what it was handed to) and its end, as a layer of
    :class:`muxtwist.sniffing.SniffingProtocol`, above the PROXY pre-stage.
    """

    __slots__ = (
        "_active",
        "_bytes_in",
        "_bytes_out",
        "_handed_to",
        "ended_at",
        "outcome",
        "rule_name",
        "sniff_time",
        "started",
    )

    factory: EndOwner
    outcome: Outcome | None
    rule_name: str
    started: float
    sniff_time: float | None
    ended_at: float | None
    _handed_to: IProtocolFactory | None
    _active: RuleStats | None
    _bytes_in: int
    _bytes_out: int

    def _ended(self, winner: IProtocol | None = None) -> None:
        """The connection ended (once; later calls do nothing); ``winner`` is the protocol it was handed to."""
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
        observer = factory.metrics
        logged = factory.log_connections and factory._refusals.log_end(outcome, rule)
        if not logged and isinstance(observer, Observers) and not observer.observers:
            # Nobody reads the end: the rule's figures above are all it leaves.
            return
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
        observer.connection_end(end)
        if logged:
            _CONNECTION_LOG.connection_end(end)
