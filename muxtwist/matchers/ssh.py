"""
SSH: the client's identification line, ``SSH-2.0-software comments CRLF``
(RFC 4253, section 4.2), protocol 2.0 or the compatible 1.99.

Bytes read by :class:`SSH`: the first 8 or 9 bytes. ``SSH-2.0-`` or
``SSH-1.99-`` is conclusive (a client must send its identification first,
and nothing else starts so), so the matcher decides there, without waiting
for the rest of the line or its CRLF; NO_MATCH at the first byte that cannot
start either. :func:`parse_identification` reads the whole line, for the
software version: NO_MATCH at a control character in it; NEED_MORE until the
line ends, bound ``MAX_LINE`` (255) bytes.
"""

from __future__ import annotations

import re

import attrs
from zope.interface import implementer

from muxtwist._rules import needs_bytes
from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers import _options

__all__ = ["MAX_LINE", "SSH", "parse_identification"]

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

MAX_LINE = 255
_PREFIXES = (b"SSH-2.0-", b"SSH-1.99-")
_BAD = re.compile(rb"[^\x20-\x7e]")


def parse_identification(data: bytes) -> tuple[Verdict, str | None]:
    """(MATCH, "software comments") for a complete 2.0/1.99 identification line; never raises."""
    for prefix in _PREFIXES:
        if len(data) < len(prefix):
            if prefix.startswith(data):
                return NEED_MORE, None
            continue
        if not data.startswith(prefix):
            continue
        end = data.find(b"\n", 0, MAX_LINE)
        line = data[len(prefix) : MAX_LINE if end < 0 else end]
        # The CR of CRLF may arrive before its LF.
        line = line.removesuffix(b"\r")
        if _BAD.search(line) or line.startswith(b" "):
            return NO_MATCH, None
        if end < 0:
            return (NO_MATCH if len(data) >= MAX_LINE else NEED_MORE), None
        return (MATCH, line.decode("ascii")) if line else (NO_MATCH, None)
    return NO_MATCH, None


@needs_bytes
@implementer(IMatcher)
@attrs.frozen
class SSH:
    """An SSH client identification line for protocol 2.0 (or 1.99)."""

    name: str = attrs.field(default="ssh", kw_only=True, validator=_options.check_name)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        undecided = False
        for prefix in _PREFIXES:
            if data.startswith(prefix):
                return MATCH
            undecided = undecided or prefix.startswith(data)
        return NEED_MORE if undecided else NO_MATCH
