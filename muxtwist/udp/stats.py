"""
UDP flow counters and their Prometheus series, kept beside the process's
:class:`~muxtwist.metrics.Metrics` (one :class:`UDPStats` per ``Metrics``,
registered in its registry the first time a UDP listener uses it).

Series: ``muxtwist_udp_flows_total{rule,outcome}``,
``muxtwist_udp_datagrams_total{rule,direction}``,
``muxtwist_udp_bytes_total{rule,direction}`` (counted when a flow ends),
``muxtwist_udp_active_flows{rule}``, ``muxtwist_udp_flow_table_entries``
and ``muxtwist_udp_dropped_datagrams_total{reason}`` (read at scrape time).
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from muxtwist.metrics import Metrics
    from muxtwist.udp.flows import Flow
    from muxtwist.udp.mux import UDPMux

__all__ = ["DROP_REASONS", "UDPStats"]

#: Why a datagram was dropped without reaching a target.
DROP_REASONS = ("unmatched", "max_udp_flows", "max_flows_per_source", "not_a_flow", "not_listening", "send_failed")

_by_metrics: weakref.WeakKeyDictionary[Metrics, UDPStats] = weakref.WeakKeyDictionary()


class UDPStats(Collector):
    """
    The UDP counters of one :class:`~muxtwist.metrics.Metrics`.

    :ivar active: live handed-off flows by rule.
    :ivar dropped: datagrams dropped, by reason (:data:`DROP_REASONS`).
    :ivar ended: ``(rule, outcome) -> [flows, datagrams in, bytes in, datagrams out, bytes out]``.
    """

    def __init__(self) -> None:
        self.active: dict[str, int] = {}
        self.dropped: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
        self.ended: dict[tuple[str, str], list[int]] = {}
        self._muxes: weakref.WeakSet[UDPMux] = weakref.WeakSet()

    @classmethod
    def of(cls, metrics: Metrics) -> UDPStats:
        """The stats kept beside ``metrics`` (made and registered on first use)."""
        stats = _by_metrics.get(metrics)
        if stats is None:
            stats = _by_metrics[metrics] = cls()
            metrics.registry.register(stats)
        return stats

    def track(self, mux: UDPMux) -> UDPStats:
        self._muxes.add(mux)
        return self

    def flow_ended(self, rule: str, outcome: str, flow: Flow) -> None:
        counts = self.ended.get((rule, outcome))
        if counts is None:
            counts = self.ended[(rule, outcome)] = [0, 0, 0, 0, 0]
        counts[0] += 1
        counts[1] += flow.datagrams_in
        counts[2] += flow.bytes_in
        counts[3] += flow.datagrams_out
        counts[4] += flow.bytes_out

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        flows = CounterMetricFamily(
            "muxtwist_udp_flows", "UDP flows ended, by rule and outcome.", labels=["rule", "outcome"]
        )
        datagrams = CounterMetricFamily(
            "muxtwist_udp_datagrams",
            "Datagrams of ended UDP flows, by rule and direction.",
            labels=["rule", "direction"],
        )
        octets = CounterMetricFamily(
            "muxtwist_udp_bytes", "Bytes of ended UDP flows, by rule and direction.", labels=["rule", "direction"]
        )
        by_rule: dict[str, list[int]] = {}
        for (rule, outcome), counts in sorted(self.ended.items()):
            flows.add_metric([rule, outcome], counts[0])
            totals = by_rule.setdefault(rule, [0, 0, 0, 0])
            for i in range(4):
                totals[i] += counts[i + 1]
        for rule, (d_in, b_in, d_out, b_out) in sorted(by_rule.items()):
            datagrams.add_metric([rule, "in"], d_in)
            datagrams.add_metric([rule, "out"], d_out)
            octets.add_metric([rule, "in"], b_in)
            octets.add_metric([rule, "out"], b_out)
        active = GaugeMetricFamily(
            "muxtwist_udp_active_flows", "UDP flows handed to a target, by rule.", labels=["rule"]
        )
        for rule, count in sorted(self.active.items()):
            active.add_metric([rule], count)
        entries = GaugeMetricFamily(
            "muxtwist_udp_flow_table_entries", "Flow table entries (live flows and remembered unmatched remotes)."
        )
        entries.add_metric([], sum(len(m.table) for m in list(self._muxes)))
        dropped = CounterMetricFamily(
            "muxtwist_udp_dropped_datagrams",
            "Datagrams dropped before reaching a target, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(self.dropped.items()):
            dropped.add_metric([reason], count)
        return [flows, datagrams, octets, active, entries, dropped]
