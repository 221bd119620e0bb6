"""
RDP: a TPKT (RFC 1006) carrying an X.224 Connection Request, the first
packet of every RDP client ([MS-RDPBCGR] 2.2.1.1).

Bytes read: the 4-byte TPKT header (version 3, length 11 to
``MAX_PACKET``), the 7 fixed bytes of the X.224 CR (length indicator equal to
the TPKT length minus 5, code 0xE0, destination reference 0, class 0), then
the rest of the packet: an optional cookie or routing token ending in CRLF,
an optional RDP_NEG_REQ (2.2.1.1.1: type 1, length 8) and, exactly when its
flags carry CORRELATION_INFO_PRESENT (0x08), an RDP_NEG_CORRELATION_INFO
after it (2.2.1.1.2: type 6, flags 0, length 36, a 16-byte correlation id
and 16 reserved bytes that are zero). Nothing else may follow. NEED_MORE
bound: the declared TPKT length, at most ``MAX_PACKET`` bytes.
"""

from __future__ import annotations

import attrs
from zope.interface import implementer

from muxtwist._rules import needs_bytes
from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers import _options

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


_NEG_REQ = 1
_NEG_REQ_LENGTH = 8
_CORRELATION_INFO = 6
_CORRELATION_INFO_LENGTH = 36
_CORRELATION_INFO_PRESENT = 0x08


def _correlation_ok(block: bytes) -> bool:
    """An RDP_NEG_CORRELATION_INFO: type, zero flags, length 36, a correlation id and zero reserved bytes."""
    return (
        len(block) == _CORRELATION_INFO_LENGTH
        and block[0] == _CORRELATION_INFO
        and block[1] == 0
        and int.from_bytes(block[2:4], "little") == _CORRELATION_INFO_LENGTH
        and block[20:36] == bytes(16)
    )


def _variable_ok(rest: bytes) -> bool:
    if rest and rest[0] != _NEG_REQ:
        end = rest.find(b"\r\n")
        if end < 0:
            return False
        rest = rest[end + 2 :]
    if not rest:
        return True
    if len(rest) < _NEG_REQ_LENGTH or rest[0] != _NEG_REQ:
        return False
    if int.from_bytes(rest[2:4], "little") != _NEG_REQ_LENGTH:
        return False
    after = rest[_NEG_REQ_LENGTH:]
    if rest[1] & _CORRELATION_INFO_PRESENT:
        return _correlation_ok(after)
    return not after


@needs_bytes
@implementer(IMatcher)
@attrs.frozen
class RDP:
    """An RDP client's X.224 Connection Request."""

    name: str = attrs.field(default="rdp", kw_only=True, validator=_options.check_name)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        if not _fixed_ok(data[:_FIXED]):
            return NO_MATCH
        if len(data) < 4:
            return NEED_MORE
        length = int.from_bytes(data[2:4], "big")
        if len(data) < length:
            return NEED_MORE
        return MATCH if _variable_ok(data[_FIXED:length]) else NO_MATCH
