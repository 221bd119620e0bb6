"""
The flow table: one entry per remote (address, port), bounded.

Three kinds of entries share one limit: flows still being sniffed, flows
handed to a target, and *unmatched* records (a remote whose datagrams no
rule wanted, remembered until ``unmatched_timeout`` so that a flood of junk
costs one evaluation per remote). When the table is full, a new remote takes
the place of the oldest unmatched record, then of the oldest flow still
being sniffed; flows handed to a target are never evicted, so a
spoofed-source flood cannot push out legitimate traffic. Pure bookkeeping:
no I/O and no clock of its own (times are passed in).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import attrs

from muxtwist._options import shown

__all__ = ["Flow", "FlowTable"]

Address = tuple[str, int]


@attrs.define(eq=False, slots=True)
class Flow:
    """
    One remote's flow.

    :ivar held: the datagrams held while sniffing (emptied at the handoff).
    :ivar target: the ``DatagramProtocol`` the flow was handed to, or ``None``
        while sniffing.
    """

    addr: Address
    started: float
    last: float
    peer: Any = None
    held: list[bytes] = attrs.Factory(list)
    rule: str = ""
    target: Any = None
    sniff_time: float | None = None
    datagrams_in: int = 0
    bytes_in: int = 0
    datagrams_out: int = 0
    bytes_out: int = 0
    idle_timeout: float = 60.0
    timer: Any = None
    ended: bool = False

    @property
    def sniffing(self) -> bool:
        return self.target is None


class FlowTable:
    """
    The flows of one UDP listener.

    :param max_flows: the most entries of all three kinds together.
    :param max_flows_per_source: the most live flows (sniffing or handed
        off) from one source host; ``None``: no limit.
    :param unmatched_timeout: seconds an unmatched remote is remembered.
    """

    def __init__(self, max_flows: int, max_flows_per_source: int | None, unmatched_timeout: float) -> None:
        if max_flows < 1:
            raise ValueError(f"max_udp_flows must be a positive integer, got {shown(max_flows)}")
        self.max_flows = max_flows
        self.max_flows_per_source = max_flows_per_source
        self.unmatched_timeout = unmatched_timeout
        #: Live flows (sniffing and handed off), by remote.
        self.flows: dict[Address, Flow] = {}
        self._sniffing: OrderedDict[Address, Flow] = OrderedDict()
        self._unmatched: OrderedDict[Address, float] = OrderedDict()
        self._per_source: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.flows) + len(self._unmatched)

    @property
    def sniffing(self) -> int:
        return len(self._sniffing)

    @property
    def unmatched(self) -> int:
        return len(self._unmatched)

    def is_unmatched(self, addr: Address, now: float) -> bool:
        """Whether ``addr`` is remembered as unmatched (forgetting it once its time is up)."""
        expires = self._unmatched.get(addr)
        if expires is None:
            return False
        if now < expires:
            return True
        del self._unmatched[addr]
        return False

    def room_for(self, addr: Address) -> tuple[str | None, list[Flow]]:
        """
        Make room for a new flow from ``addr``: ``(refusal, evicted)``. A
        refusal names the limit that keeps it out (``max_flows_per_source``
        or ``max_udp_flows``); ``evicted`` are the sniffing flows removed to
        make room, for the caller to end.
        """
        limit = self.max_flows_per_source
        if limit is not None and self._per_source.get(addr[0], 0) >= limit:
            return "max_flows_per_source", []
        evicted: list[Flow] = []
        while len(self.flows) + len(self._unmatched) >= self.max_flows:
            if self._unmatched:
                self._unmatched.popitem(last=False)
            elif self._sniffing:
                _, oldest = self._sniffing.popitem(last=False)
                self._drop(oldest)
                evicted.append(oldest)
            else:
                return "max_udp_flows", evicted
        return None, evicted

    def add(self, flow: Flow) -> None:
        """A new sniffing flow (after :meth:`room_for` said there is room)."""
        self.flows[flow.addr] = flow
        self._sniffing[flow.addr] = flow
        host = flow.addr[0]
        self._per_source[host] = self._per_source.get(host, 0) + 1

    def handed_off(self, flow: Flow) -> None:
        """``flow`` now has a target: it no longer counts as sniffing (and is never evicted)."""
        self._sniffing.pop(flow.addr, None)

    def remove(self, flow: Flow) -> bool:
        """Forget a live flow; whether it was there."""
        if self.flows.get(flow.addr) is not flow:
            return False
        self._sniffing.pop(flow.addr, None)
        self._drop(flow)
        return True

    def remember_unmatched(self, addr: Address, now: float) -> None:
        """Remember ``addr`` as unmatched (its flow must be removed first)."""
        self._unmatched[addr] = now + self.unmatched_timeout
        self._unmatched.move_to_end(addr)

    def _drop(self, flow: Flow) -> None:
        del self.flows[flow.addr]
        host = flow.addr[0]
        left = self._per_source[host] - 1
        if left:
            self._per_source[host] = left
        else:
            del self._per_source[host]
