"""
UDP on the same port number: datagram listeners, the per-flow sniffer
(:class:`UDPMux`), its bounded flow table, and :class:`UDPProxy`.

A UDP listener takes the same :class:`~muxtwist.sniffing.Rule` list as a
TCP one; its targets are ``DatagramProtocol`` s: a :class:`UDPProxy` or your
own protocol served in-process.
"""

from muxtwist.matchers.datagram import DatagramInfo
from muxtwist.udp.flows import Flow, FlowTable
from muxtwist.udp.interfaces import IFlowTarget, IFlowTransport
from muxtwist.udp.listener import UDPListener, build_udp_mux, is_udp, parse_udp_description
from muxtwist.udp.mux import UDPMux, is_datagram_target
from muxtwist.udp.proxy import UDPProxy

__all__ = [
    "DatagramInfo",
    "Flow",
    "FlowTable",
    "IFlowTarget",
    "IFlowTransport",
    "UDPListener",
    "UDPMux",
    "UDPProxy",
    "build_udp_mux",
    "is_datagram_target",
    "is_udp",
    "parse_udp_description",
]
