"""
RDP: a TPKT (RFC 1006) carrying an X.224 Connection Request, the first
packet of every RDP client ([MS-RDPBCGR] 2.2.1.1).

Bytes read: the 4-byte TPKT header (version 3, length 11 to
``MAX_PACKET``), the 7 fixed bytes of the X.224 CR (length indicator equal to
the TPKT length minus 5, code 0xE0, destination reference 0, class 0), then
the rest of the packet: an optional cookie or routing token ending in CRLF,
and an optional RDP_NEG_REQ (type 1, length 8). NEED_MORE bound: the
declared TPKT length, at most ``MAX_PACKET`` bytes.
"""

from __future__ import annotations

import attrs
from zope.interface import implementer

from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict

__all__ = ["MAX_PACKET", "RDP"]

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

MAX_PACKET = 2048
_FIXED = 11


def _fixed_ok(data: bytes) -> bool:
    """Check what has arrived of the 11 fixed bytes."""
    expected = {0: 3, 1: 0, 5: 0xE0, 6: 0, 7: 0, 10: 0}
    for i, want in expected.items():
        if i < len(data) and data[i] != want:
            return False
    if len(data) >= 4:
        length = int.from_bytes(data[2:4], "big")
        if length < _FIXED or length > MAX_PACKET:
            return False
        if len(data) >= 5 and data[4] != length - 5:
            return False
    return True


def _variable_ok(rest: bytes) -> bool:
    if rest and rest[0] != 1:
        end = rest.find(b"\r\n")
        if end < 0:
            return False
        rest = rest[end + 2 :]
    if not rest:
        return True
    return len(rest) >= 8 and rest[0] == 1 and rest[2:4] == b"\x08\x00"


@implementer(IMatcher)
@attrs.frozen
class RDP:
    """An RDP client's X.224 Connection Request."""

    name: str = attrs.field(default="rdp", kw_only=True)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        if not _fixed_ok(data[:_FIXED]):
            return NO_MATCH
        if len(data) < 4:
            return NEED_MORE
        length = int.from_bytes(data[2:4], "big")
        if len(data) < length:
            return NEED_MORE
        return MATCH if _variable_ok(data[_FIXED:length]) else NO_MATCH
