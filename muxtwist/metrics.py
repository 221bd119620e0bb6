"""
Prometheus metrics of the sniffers and of the proxies behind them.

What changes per connection is counted once, when the connection ends
(:meth:`Metrics.connection_ended`). What is live (connections open by rule,
backend health and counters kept by :class:`~muxtwist.proxy.Proxy`) is read
from the objects themselves at scrape time by a custom collector, so the
relay's hot path carries no metrics code at all.

Each :class:`Metrics` has its own ``CollectorRegistry`` (never the
``prometheus_client`` global one), so tests and embedders stay isolated.
"""

from __future__ import annotations

import weakref
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import implementer

from muxtwist._reachable import backend_pools, is_sniffer, reachable
from muxtwist._text import BurstLog
from muxtwist.interfaces import ConnectionEnd, IBackendPool, IConnectionObserver
from muxtwist.udp._counts import HasFlowTable
from muxtwist.udp.stats import UDPStats

__all__ = [
    "LIMITS",
    "OUTCOMES",
    "Metrics",
    "backend_pools",
    "default_metrics",
    "nested_sniffers",
    "proxies_of",
    "reachable",
]

#: The ``outcome`` label values of ``muxtwist_connections_total``.
OUTCOMES = (
    "handed_off",
    "timeout",
    "no_match",
    "rejected",
    "backend_failed",
    "closed_while_sniffing",
    "aborted_while_sniffing",
)

#: The ``limit`` label values of ``muxtwist_limit_rejections_total``.
LIMITS = (
    "max_connections",
    "max_connections_per_source",
    "rule_max_connections",
    "emfile",
    "max_handshakes",
    "max_handshakes_per_source",
)


class _Connection(Protocol):
    @property
    def sniffing(self) -> bool: ...


class Tracked(Protocol):
    """
    What :class:`Metrics` reads from a tracked sniffing factory at scrape time
    (:class:`muxtwist.SniffingFactory` provides it): typed here so that this
    module does not import the sniffer, which reports to it.
    """

    @property
    def stats(self) -> Mapping[str, Any]: ...

    @property
    def connections(self) -> Iterable[_Connection]: ...


SNIFF_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@implementer(IConnectionObserver)
class Metrics:
    """
    The counters of one process (or one test); an
    :class:`~muxtwist.interfaces.IConnectionObserver`.

    :ivar registry: the ``CollectorRegistry`` that ``/metrics`` exposes.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.limit_rejections = Counter(
            "muxtwist_limit_rejections",
            "Connections closed at once because a limit was reached.",
            ["limit"],
            registry=self.registry,
        )
        for limit in LIMITS:
            self.limit_rejections.labels(limit)
        self._factories: weakref.WeakSet[Any] = weakref.WeakSet()
        self._udp: UDPStats | None = None
        # What ends with each connection is kept in plain lists and turned
        # into metric families at scrape time: a few additions per
        # connection instead of prometheus_client's locked updates.
        self._ended: dict[tuple[str, str], list[int]] = {}
        self._sniff_buckets = [0] * (len(SNIFF_BUCKETS) + 1)
        self._sniff_sum = 0.0
        self.registry.register(_EndedCollector(self))
        self.registry.register(_LiveCollector(self))

    def track(self, factory: Tracked) -> None:
        """
        Read ``factory``'s live numbers at scrape time, and those of the
        sniffing factories nested in its rules (held weakly). Called by the
        owner of these metrics: a factory given them, or a ``MuxService``.
        """
        self._factories.add(factory)

    def track_udp(self, mux: HasFlowTable) -> UDPStats:
        """
        Read ``mux``'s flow table at scrape time (held weakly), and give the
        UDP counters it counts into: those of these metrics, made and
        registered on first use. Called by a ``UDPMux`` given these metrics
        (a ``MuxService`` gives its own to the UDP listeners it builds).
        """
        if self._udp is None:
            self._udp = UDPStats()
            self.registry.register(self._udp)
        return self._udp.track(mux)

    @property
    def factories(self) -> list[Any]:
        """The sniffing factories being tracked and still alive."""
        return list(self._factories)

    def connection_end(self, end: ConnectionEnd) -> None:
        """Count one connection that has ended (:class:`~muxtwist.interfaces.IConnectionObserver`)."""
        self.connection_ended(end.rule, end.outcome, end.sniff_time, end.sniffed_in, end.sniffed_out)

    def connection_ended(self, rule: str, outcome: str, sniff_time: float, bytes_in: int, bytes_out: int) -> None:
        """Count one connection that has ended."""
        counts = self._ended.get((rule, outcome))
        if counts is None:
            counts = self._ended[(rule, outcome)] = [0, 0, 0]
        counts[0] += 1
        counts[1] += bytes_in
        counts[2] += bytes_out
        self._sniff_buckets[bisect_left(SNIFF_BUCKETS, sniff_time)] += 1
        self._sniff_sum += sniff_time

    def connections_by_outcome(self) -> dict[str, int]:
        """Connections ended so far, by outcome (all rules)."""
        totals: dict[str, int] = {}
        for (_, outcome), counts in self._ended.items():
            totals[outcome] = totals.get(outcome, 0) + counts[0]
        return totals

    def limit_rejected(self, limit: str) -> None:
        """Count one connection closed because ``limit`` was reached."""
        self.limit_rejections.labels(limit).inc()

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample (0 when absent): for status pages and tests."""
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    def watch_emfile(self) -> EmfileWatcher:
        """
        Count the clients Twisted's listening ports close when the process
        is out of file descriptors; returns the watcher, to stop it later.
        """
        watcher = EmfileWatcher(self)
        globalLogPublisher.addObserver(watcher)
        return watcher


_EMFILE_CLOSED = "EMFILE recovery: Closed socket from {address}"
_EMFILE_THROTTLED = (
    "out of file descriptors: closed a waiting client ({address}) and {suppressed} more not logged since the last line"
)
_EMFILE_TAIL = (
    "out of file descriptors: closed {suppressed} more waiting clients not logged since the last line"
    " (the last: {address})"
)


@implementer(ILogObserver)
class EmfileWatcher:
    """
    ``twisted.internet.tcp.Port`` answers EMFILE by closing its reserved
    descriptor, accepting and closing the waiting clients, then reserving
    again; it logs one event per client closed. This observer counts them.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_format") == _EMFILE_CLOSED:
            self.metrics.limit_rejected("emfile")

    def stop(self) -> None:
        globalLogPublisher.removeObserver(self)


@implementer(ILogObserver)
class EmfileThrottle:
    """
    The log observer of one listening port: counts every client the port
    closes for want of descriptors (metric ``limit_rejections{limit="emfile"}``),
    passes at most one such line a second on, saying how many were left out,
    and passes everything else on unchanged. When the clients stop, the
    count still pending is passed on in a line of its own within a second
    (at once by :meth:`flush`).
    """

    def __init__(self, metrics: Metrics, reactor: Any, forward: ILogObserver = globalLogPublisher) -> None:
        self.metrics = metrics
        self._forward = forward
        self._throttle: BurstLog[LogEvent] = BurstLog(reactor, self._tail)

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_format") == _EMFILE_CLOSED:
            self.metrics.limit_rejected("emfile")
            suppressed = self._throttle.admit("emfile", event)
            if suppressed is None:
                return
            event = dict(event, log_format=_EMFILE_THROTTLED, suppressed=suppressed)
        self._forward(event)

    def flush(self) -> None:
        """Pass on the count of clients not logged yet now (the port stops), and cancel the timer that would have."""
        self._throttle.flush()

    def _tail(self, event: LogEvent, suppressed: int) -> None:
        # The last client left out, told with the count it ends, when no line followed within a second.
        self._forward(dict(event, log_format=_EMFILE_TAIL, suppressed=suppressed))


def proxies_of(factory: object, seen: set[int] | None = None) -> Iterator[tuple[str, IBackendPool]]:
    """The same as :func:`backend_pools`, under its earlier name."""
    return backend_pools(factory, seen)


def nested_sniffers(factory: object) -> Iterator[Tracked]:
    """The sniffing factories reachable from ``factory``'s rules (behind ``TerminateTLS`` and the like)."""
    for _, target in reachable(factory):
        if is_sniffer(target):
            yield target  # type: ignore[misc]


def with_nested(factories: Iterable[Tracked]) -> list[Tracked]:
    """``factories`` and the sniffing factories nested in them, each once, outer ones first."""
    found: dict[int, Tracked] = {}
    for factory in factories:
        found.setdefault(id(factory), factory)
        for inner in nested_sniffers(factory):
            found.setdefault(id(inner), inner)
    return list(found.values())


class _Collector(Collector):
    """Families built from one :class:`Metrics` at scrape time (none described up front)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []


class _EndedCollector(_Collector):
    """Turns the counts kept by :meth:`Metrics.connection_ended` into metric families."""

    def collect(self) -> Iterable[Metric]:
        m = self.metrics
        connections = CounterMetricFamily(
            "muxtwist_connections",
            "Connections ended, by the rule that got them and how sniffing ended.",
            labels=["rule", "outcome"],
        )
        sniffed = CounterMetricFamily(
            "muxtwist_sniffed_bytes",
            "Bytes read from clients while sniffing (in) and written to them by responding matchers (out).",
            labels=["rule", "direction"],
        )
        by_rule: dict[str, list[int]] = {}
        for (rule, outcome), (count, got, sent) in sorted(m._ended.items()):
            connections.add_metric([rule, outcome], count)
            totals = by_rule.setdefault(rule, [0, 0])
            totals[0] += got
            totals[1] += sent
        for rule, (got, sent) in sorted(by_rule.items()):
            sniffed.add_metric([rule, "in"], got)
            sniffed.add_metric([rule, "out"], sent)
        cumulative, buckets = 0, []
        for bound, count in zip([*SNIFF_BUCKETS, float("inf")], m._sniff_buckets, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        duration = HistogramMetricFamily(
            "muxtwist_sniff_duration_seconds",
            "Seconds from accept to the rules' decision.",
            buckets=buckets,
            sum_value=m._sniff_sum,
        )
        return [connections, sniffed, duration]


class _LiveCollector(_Collector):
    """Reads live connection counts and proxy backends at scrape time."""

    def collect(self) -> Iterable[Metric]:
        active = GaugeMetricFamily("muxtwist_active_connections", "Connections open now, by rule.", labels=["rule"])
        sniffing = GaugeMetricFamily("muxtwist_sniffing_connections", "Connections still being sniffed.")
        up = GaugeMetricFamily(
            "muxtwist_backend_up", "1 when the backend is usable (health checks pass).", labels=["rule", "backend"]
        )
        relays = GaugeMetricFamily(
            "muxtwist_backend_active_connections", "Relays open to the backend now.", labels=["rule", "backend"]
        )
        opened = CounterMetricFamily(
            "muxtwist_backend_connections", "Relays ever opened to the backend.", labels=["rule", "backend"]
        )
        failures = CounterMetricFamily(
            "muxtwist_backend_failures",
            "Connect failures and mid-stream resets, by kind.",
            labels=["rule", "backend", "kind"],
        )
        transparent = CounterMetricFamily(
            "muxtwist_backend_transparent_connections",
            "Relays opened to the backend from the client's own address (transparent=True).",
            labels=["rule", "backend"],
        )
        gave_up = CounterMetricFamily(
            "muxtwist_proxy_gave_up", "Connections a proxy closed: no backend could take them.", labels=["rule"]
        )
        by_rule: dict[str, int] = {}
        n_sniffing = 0
        tracked = self.metrics.factories
        for factory in with_nested(tracked):
            for name, stats in list(factory.stats.items()):
                if name != "-":  # connections that ended before any rule got them
                    by_rule[name] = by_rule.get(name, 0) + stats.active
            n_sniffing += sum(1 for c in list(factory.connections) if c.sniffing)
        seen: set[int] = set()
        for factory in tracked:
            for rule, pool in backend_pools(factory, seen):
                gave_up.add_metric([rule], pool.gave_up)
                for state in pool.backend_states():
                    labels = [rule, state.description]
                    up.add_metric(labels, 1.0 if state.usable else 0.0)
                    relays.add_metric(labels, state.active)
                    opened.add_metric(labels, state.total)
                    if pool.transparent:
                        transparent.add_metric(labels, state.transparent)
                    errors = dict(state.errors)
                    if not errors and state.failures:
                        errors = {"error": state.failures}
                    for kind, count in sorted(errors.items()):
                        failures.add_metric([*labels, kind], count)
        for name, count in sorted(by_rule.items()):
            active.add_metric([name], count)
        sniffing.add_metric([], n_sniffing)
        return [active, sniffing, up, relays, opened, transparent, failures, gave_up]


_default: Metrics | None = None


def default_metrics() -> Metrics:
    """
    The :class:`Metrics` of this process: what a :class:`~muxtwist.service.MuxService`
    counts into unless given its own, and what :func:`~muxtwist.admin.admin_site`
    shows by default. Nothing is read or counted by it for being built: a
    ``MuxService`` says which factories and UDP muxes it reads.
    """
    global _default
    if _default is None:
        _default = Metrics()
    return _default
