"""
UDP flow counters and their Prometheus series, kept beside a
:class:`~muxtwist.metrics.Metrics` (one :class:`UDPStats` per ``Metrics``,
made and registered in its registry by ``Metrics.track_udp`` the first time
a UDP mux is given those metrics).

Series: ``muxtwist_udp_flows_total{rule,outcome}``,
``muxtwist_udp_datagrams_total{rule,direction}``,
``muxtwist_udp_bytes_total{rule,direction}`` (counted when a flow ends),
``muxtwist_udp_active_flows{rule}``, ``muxtwist_udp_flow_table_entries``
and ``muxtwist_udp_dropped_datagrams_total{reason}`` (read at scrape time).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from muxtwist.udp._counts import DROP_REASONS, FlowCounts, HasFlowTable

__all__ = ["DROP_REASONS", "UDPStats"]


class UDPStats(FlowCounts, Collector):
    """
    The UDP counters of one :class:`~muxtwist.metrics.Metrics`, and the muxes
    whose flow tables they read at scrape time (held weakly).
    """

    def __init__(self) -> None:
        super().__init__()
        self._muxes: weakref.WeakSet[HasFlowTable] = weakref.WeakSet()

    def track(self, mux: HasFlowTable) -> UDPStats:
        self._muxes.add(mux)
        return self

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
