"""
The two sides of a flow handoff: what a datagram target may offer the mux
(:class:`IFlowTarget`) and what the mux gives every target as its
transport (:class:`IFlowTransport`).
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface

__all__ = ["IFlowTarget", "IFlowTransport"]


class IFlowTarget(Interface):
    """
    A ``DatagramProtocol`` target that wants to know when the mux ends one of
    its flows (optional: a plain ``DatagramProtocol`` target works without).
    """

    idle_timeout = Attribute(
        "Seconds without a datagram either way after which the mux ends a flow of this target; "
        "None: the listener's flow_idle_timeout."
    )

    def flow_ended(addr: tuple[str, int]) -> None:
        """The mux has ended the flow of ``addr`` (idle, evicted, stopped, or asked by ``end_flow``)."""


class IFlowTransport(Interface):
    """
    The transport the mux gives a ``DatagramProtocol`` target: ``write``
    answers a flow through the listening socket.
    """

    def write(data: bytes, addr: Any = None) -> None:
        """
        Send ``data`` to ``addr``, which must be a live flow routed to this
        target; anything else is dropped and counted (the mux never lets a
        target send to an address that has not sent to it).
        """

    def getHost() -> Any:
        """The listening socket's address."""

    def flow_writer(addr: tuple[str, int]) -> Any:
        """
        A callable sending one datagram (its only argument) to the live flow
        of ``addr``, routed to this target, as ``write(data, addr)`` would,
        for targets that answer one flow many times (the flow is looked up
        once); once the flow has ended it drops what it is given (counted).
        ``None`` if ``addr`` is not such a flow.
        """

    def end_flow(addr: tuple[str, int], outcome: str = "handed_off") -> None:
        """End the flow of ``addr`` now (the target is done with it, or its backend failed)."""
