"""
STUN (RFC 5389, RFC 8489) and TURN (RFC 8656) requests and indications.

Bytes read: the first datagram (on TCP, the buffer, whose first message must
be whole). The two top bits are zero; the class is request or indication
(what a client sends first); the method is one of :data:`METHODS`; the
length is a multiple of 4 and, on UDP, the datagram is exactly 20 bytes of
header plus that length; the magic cookie 0x2112A442 follows; the attributes
fill the body exactly, each padded to 4 bytes, and a FINGERPRINT attribute,
when present, must be last and right (CRC-32 of what precedes it, XOR
0x5354554E). NEED_MORE only on TCP before the message is whole.
"""

from __future__ import annotations

import zlib

import attrs
from zope.interface import implementer

from muxtwist._options import shown
from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers.datagram import datagrams_of, is_datagram

__all__ = ["MAGIC_COOKIE", "METHODS", "STUN"]

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

MAGIC_COOKIE = b"\x21\x12\xa4\x42"
#: Method numbers by name (STUN Binding and the TURN methods).
METHODS = {
    "binding": 0x001,
    "allocate": 0x003,
    "refresh": 0x004,
    "send": 0x006,
    "data": 0x007,
    "create_permission": 0x008,
    "channel_bind": 0x009,
}
_FINGERPRINT = 0x8028
_FINGERPRINT_XOR = 0x5354554E
_MAX_MESSAGE = 65535


def _message_ok(message: bytes) -> bool:
    """The attributes after the 20-byte header fill the message, and a FINGERPRINT is last and right."""
    pos, end = 20, len(message)
    while pos < end:
        if pos + 4 > end:
            return False
        kind = int.from_bytes(message[pos : pos + 2], "big")
        length = int.from_bytes(message[pos + 2 : pos + 4], "big")
        value_end = pos + 4 + length
        padded = pos + 4 + (length + 3) // 4 * 4
        if padded > end:
            return False
        if kind == _FINGERPRINT:
            if length != 4 or padded != end:
                return False
            want = (zlib.crc32(message[:pos]) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF
            return int.from_bytes(message[pos + 4 : value_end], "big") == want
        pos = padded
    return pos == end


def _methods(value: str | tuple[str, ...] | None) -> frozenset[int] | None:
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else value
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown STUN method(s) {shown(unknown)}; use {', '.join(METHODS)}")
    return frozenset(METHODS[n] for n in names)


@implementer(IMatcher)
@attrs.frozen
class STUN:
    """
    A STUN or TURN request or indication.

    :param methods: method names (:data:`METHODS`) to accept; ``None``: all.
    """

    methods: frozenset[int] | None = attrs.field(default=None, converter=_methods)
    name: str = attrs.field(default="stun", kw_only=True)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        grams = datagrams_of(data, info)
        message = grams[0] if grams else b""
        if message[:1] and message[0] & 0xC0:
            return NO_MATCH
        if len(message) >= 2:
            kind = int.from_bytes(message[:2], "big")
            method = (kind & 0x000F) | ((kind & 0x00E0) >> 1) | ((kind & 0x3E00) >> 2)
            klass = ((kind >> 4) & 0x01) | ((kind >> 7) & 0x02)
            if klass > 1 or method not in (self.methods if self.methods is not None else METHODS.values()):
                return NO_MATCH
        if len(message) >= 4 and int.from_bytes(message[2:4], "big") % 4:
            return NO_MATCH
        if message[4:8] != MAGIC_COOKIE[: max(0, min(4, len(message) - 4))]:
            return NO_MATCH
        if len(message) < 20:
            return NO_MATCH if is_datagram(info) else NEED_MORE
        size = 20 + int.from_bytes(message[2:4], "big")
        if len(message) < size and not is_datagram(info):
            return NEED_MORE
        if is_datagram(info) and len(message) != size:
            return NO_MATCH
        return MATCH if _message_ok(message[:size]) else NO_MATCH
