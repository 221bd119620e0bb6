"""
What a :class:`~muxtwist.udp.mux.UDPMux` counts into, with no
``prometheus_client``: :class:`FlowCounts` (the counters, which
:class:`~muxtwist.udp.stats.UDPStats` turns into Prometheus series) and
:class:`Uncounted` (the connection ends and refusals of a mux given no
metrics go nowhere). A mux built alone imports no metrics code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sized
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from muxtwist.udp.flows import Flow

__all__ = ["DROP_REASONS", "FlowCounts", "HasFlowTable", "Uncounted"]

#: Why a datagram was dropped without reaching a target.
DROP_REASONS = ("unmatched", "max_udp_flows", "max_flows_per_source", "not_a_flow", "not_listening", "send_failed")


class HasFlowTable(Protocol):
    """What the UDP series read of a mux at scrape time: its flow table's size."""

    @property
    def table(self) -> Sized: ...


class FlowCounts:
    """
    The UDP counters of one or more muxes.

    :ivar active: live handed-off flows by rule.
    :ivar dropped: datagrams dropped, by reason (:data:`DROP_REASONS`).
    :ivar ended: ``(rule, outcome) -> [flows, datagrams in, bytes in, datagrams out, bytes out]``.
    """

    def __init__(self) -> None:
        self.active: dict[str, int] = {}
        self.dropped: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
        self.ended: dict[tuple[str, str], list[int]] = {}

    def flow_ended(self, rule: str, outcome: str, flow: Flow) -> None:
        counts = self.ended.get((rule, outcome))
        if counts is None:
            counts = self.ended[(rule, outcome)] = [0, 0, 0, 0, 0]
        counts[0] += 1
        counts[1] += flow.datagrams_in
        counts[2] += flow.bytes_in
        counts[3] += flow.datagrams_out
        counts[4] += flow.bytes_out


class Uncounted:
    """Stands for the metrics of a mux given none: every end and refusal goes uncounted."""

    def connection_ended(self, rule: str, outcome: str, sniff_time: float, bytes_in: int, bytes_out: int) -> None:
        pass

    def limit_rejected(self, limit: str) -> None:
        pass
