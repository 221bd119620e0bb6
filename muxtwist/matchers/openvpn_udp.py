"""
OpenVPN over UDP: the client's first packet, a P_CONTROL_HARD_RESET_CLIENT
(V1, V2, or V3 for tls-crypt-v2), with no length prefix (a datagram is one
packet).

Bytes read: the first datagram (on TCP, the buffer as one packet). The same
checks as :mod:`muxtwist.matchers.openvpn`, whose layout rules are reused:
14 to ``MAX_PACKET`` bytes, a hard-reset opcode with key id 0, a non-zero
session id, and a plain, ``tls-auth`` or ``tls-crypt`` layout. Never
NEED_MORE on UDP.
"""

from __future__ import annotations

import attrs
from zope.interface import implementer

from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers.datagram import datagrams_of, is_datagram
from muxtwist.matchers.openvpn import _HARD_RESET_CLIENT, _MIN_PACKET, MAX_PACKET, _layout_ok

__all__ = ["OpenVPNUDP", "match_udp_packet"]

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE


def match_udp_packet(packet: bytes, complete: bool = True) -> Verdict:
    """The verdict on one OpenVPN UDP packet (``complete``: nothing more of it can come)."""
    if packet[:1] and (packet[0] >> 3 not in _HARD_RESET_CLIENT or packet[0] & 0x07):
        return NO_MATCH
    if len(packet) > MAX_PACKET:
        return NO_MATCH
    if len(packet) < _MIN_PACKET:
        return NO_MATCH if complete else NEED_MORE
    if packet[1:9] == b"\x00" * 8:
        return NO_MATCH
    return MATCH if _layout_ok(packet) else NO_MATCH


@implementer(IMatcher)
@attrs.frozen
class OpenVPNUDP:
    """An OpenVPN UDP client's hard-reset packet (``OpenVPN()`` on a UDP listener is the same)."""

    name: str = attrs.field(default="openvpn", kw_only=True)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        grams = datagrams_of(data, info)
        return match_udp_packet(grams[0] if grams else b"", complete=is_datagram(info))
