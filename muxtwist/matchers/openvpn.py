"""
OpenVPN over TCP: the client's first packet, a P_CONTROL_HARD_RESET_CLIENT
(V1, V2, or V3 for tls-crypt-v2), behind OpenVPN's 2-byte TCP length prefix.

Bytes read: the whole first packet. Its length must be 14 to
``MAX_PACKET``; the opcode byte must carry a hard-reset opcode and key id 0;
the session id must not be zero; and the rest must fit one of the wire
layouts: plain (ACK count 0 and message packet id 0 right after the session
id), ``tls-auth`` with a 20, 32, 48 or 64-byte HMAC (replay packet id and
time, then ACK count 0 and message packet id 0), or ``tls-crypt`` (a non-zero
replay packet id, a time and a 32-byte tag, the rest encrypted). NEED_MORE
bound: the declared length, at most ``MAX_PACKET`` + 2 bytes.
"""

from __future__ import annotations

import attrs
from zope.interface import implementer

from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict

__all__ = ["MAX_PACKET", "OpenVPN"]

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

MAX_PACKET = 2048
_MIN_PACKET = 14  # opcode 1 + session id 8 + ACK count 1 + packet id 4
_HARD_RESET_CLIENT = frozenset({1, 7, 10})  # V1, V2, V3
_HMAC_SIZES = (20, 32, 48, 64)
_ZERO5 = b"\x00" * 5


def _layout_ok(packet: bytes) -> bool:
    """Whether the bytes after opcode and session id fit a known layout."""
    if packet[9:14] == _ZERO5:
        return True
    for size in _HMAC_SIZES:
        ack = 9 + size + 8
        if packet[9 + size : 13 + size] != b"\x00\x00\x00\x00" and packet[ack : ack + 5] == _ZERO5:
            return True
    return len(packet) >= 9 + 8 + 32 and packet[9:13] != b"\x00\x00\x00\x00"


@implementer(IMatcher)
@attrs.frozen
class OpenVPN:
    """An OpenVPN TCP client's hard-reset packet, which opens every session."""

    name: str = attrs.field(default="openvpn", kw_only=True)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        if len(data) >= 2:
            length = int.from_bytes(data[:2], "big")
            if length < _MIN_PACKET or length > MAX_PACKET:
                return NO_MATCH
        if len(data) >= 3 and (data[2] >> 3 not in _HARD_RESET_CLIENT or data[2] & 0x07):
            return NO_MATCH
        if len(data) < 11:
            # A length prefix's first byte above MAX_PACKET's already says no.
            return NO_MATCH if data[:1] > bytes([MAX_PACKET >> 8]) else NEED_MORE
        if data[3:11] == b"\x00" * 8:
            return NO_MATCH
        if len(data) < 2 + length:
            return NEED_MORE
        return MATCH if _layout_ok(data[2 : 2 + length]) else NO_MATCH
