"""
OpenVPN over TCP: the client's first packet, a P_CONTROL_HARD_RESET_CLIENT
(V1, V2, or V3 for tls-crypt-v2), behind OpenVPN's 2-byte TCP length prefix.

Bytes read: the whole first packet. Its length must be 14 to
``MAX_PACKET``; the opcode byte must carry a hard-reset opcode and key id 0;
the session id must not be zero; and the rest must fit one of the wire
layouts OpenVPN writes:

- plain (no ``--tls-auth``): ACK count 0 and message packet id 0 right after
  the session id;
- ``tls-auth``: an HMAC of one of :data:`HMAC_SIZES` bytes (the digests
  ``--auth`` takes: MD5 16, SHA1 and RIPEMD160 20, SHA224 28, SHA256 32,
  MD5-SHA1 36, SHA384 48, SHA512 64, and the SHA3, SHA512/t, BLAKE2 and SM3
  digests of those sizes), a non-zero replay packet id and time, then ACK
  count 0 and message packet id 0;
- ``tls-crypt`` (V2) and ``tls-crypt-v2`` (V3, the only layout V3 has): a
  non-zero replay packet id and time, a 32-byte tag, then at least the
  5 encrypted bytes of ACK count and message packet id.

NEED_MORE bound: the declared length, at most ``MAX_PACKET`` + 2 bytes.
"""

from __future__ import annotations

import attrs
from zope.interface import implementer

from muxtwist._rules import needs_bytes
from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers import _options
from muxtwist.matchers.datagram import DatagramInfo

__all__ = ["HMAC_SIZES", "MAX_PACKET", "OpenVPN"]

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

MAX_PACKET = 2048
_MIN_PACKET = 14  # opcode 1 + session id 8 + ACK count 1 + packet id 4
_V1, _V2, _V3 = 1, 7, 10
_HARD_RESET_CLIENT = frozenset({_V1, _V2, _V3})
#: The HMAC sizes of every digest OpenVPN's ``--auth`` accepts for tls-auth.
HMAC_SIZES = (16, 20, 28, 32, 36, 48, 64)
_TAG = 32
_ZERO4 = b"\x00" * 4
_ZERO5 = b"\x00" * 5


def _replay_ok(packet: bytes, at: int) -> bool:
    """A long-form replay packet id and time at ``at``: both non-zero, as OpenVPN writes them."""
    return len(packet) >= at + 8 and packet[at : at + 4] != _ZERO4 and packet[at + 4 : at + 8] != _ZERO4


def _layout_ok(packet: bytes) -> bool:
    """Whether the bytes after opcode and session id fit a known layout."""
    opcode = packet[0] >> 3
    tls_crypt = _replay_ok(packet, 9) and len(packet) >= 9 + 8 + _TAG + 5
    if opcode == _V3:
        return tls_crypt
    if packet[9:14] == _ZERO5:
        return True
    for size in HMAC_SIZES:
        ack = 9 + size + 8
        if _replay_ok(packet, 9 + size) and packet[ack : ack + 5] == _ZERO5:
            return True
    return tls_crypt


@needs_bytes
@implementer(IMatcher)
@attrs.frozen
class OpenVPN:
    """An OpenVPN TCP client's hard-reset packet, which opens every session."""

    name: str = attrs.field(default="openvpn", kw_only=True, validator=_options.check_name)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        if isinstance(info, DatagramInfo) and info.datagrams:
            # On UDP a datagram is one packet, with no length prefix: read it as the TCP form.
            data = min(len(info.datagrams[0]), 0xFFFF).to_bytes(2, "big") + info.datagrams[0]
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
