"""
DNS: a query's header and its first question (RFC 1035 4.1).

Bytes read: on UDP the first datagram, which must be the whole message; on
TCP (a plain ConnectionInfo) the message behind its 2-byte length prefix
(RFC 7766), read as far as the end of the question. The header must be a
query (QR 0) with opcode QUERY, NOTIFY or UPDATE, the Z bit clear, RCODE 0,
exactly one question, no answers (but for NOTIFY's one), no authority
records (but for UPDATE) and at most 4 additional records (EDNS, TSIG,
cookies). The question's name must be well-formed labels (63 bytes each,
255 in all, no compression pointer) followed by a type and a known class.
NEED_MORE only on TCP, until the question is there.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import attrs
from zope.interface import implementer

from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers.datagram import is_datagram

__all__ = ["DNS", "parse_question"]

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

_HEADER = 12
_OPCODES = {0: "query", 4: "notify", 5: "update"}
_CLASSES = frozenset({1, 3, 4, 254, 255})
_MAX_ADDITIONAL = 4


def parse_question(message: bytes, complete: bool) -> tuple[Verdict, str | None]:
    """
    Check a DNS message's header and first question: (MATCH, query name),
    (NEED_MORE, None) when ``complete`` is false and the question is cut
    short, or (NO_MATCH, None). Never raises.
    """
    short = NO_MATCH if complete else NEED_MORE
    if len(message) >= 4:
        flags = int.from_bytes(message[2:4], "big")
        opcode = (flags >> 11) & 0x0F
        if flags & 0x8000 or opcode not in _OPCODES or flags & 0x0040 or flags & 0x000F:
            return NO_MATCH, None
    if len(message) < _HEADER:
        return short, None
    qd, an, ns, ar = (int.from_bytes(message[i : i + 2], "big") for i in range(4, 12, 2))
    if qd != 1 or an > (1 if opcode == 4 else 0) or (ns and opcode != 5) or ar > _MAX_ADDITIONAL:
        return NO_MATCH, None
    pos, labels, total = _HEADER, [], 0
    while True:
        if pos >= len(message):
            return short, None
        length = message[pos]
        if length == 0:
            pos += 1
            break
        if length > 63:
            return NO_MATCH, None  # a pointer (or a reserved label type) cannot start the first name
        total += length + 1
        if total > 255:
            return NO_MATCH, None
        if pos + 1 + length > len(message):
            return short, None
        labels.append(message[pos + 1 : pos + 1 + length])
        pos += 1 + length
    if pos + 4 > len(message):
        return short, None
    if int.from_bytes(message[pos + 2 : pos + 4], "big") not in _CLASSES:
        return NO_MATCH, None
    if complete and pos + 4 < len(message) and not (ar or ns or an):
        return NO_MATCH, None  # bytes after the question with no record to hold them
    return MATCH, b".".join(labels).decode("latin-1").lower()


def _names(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(n.lower().rstrip(".") for n in ((value,) if isinstance(value, str) else value))


@implementer(IMatcher)
@attrs.frozen
class DNS:
    """
    A DNS query (over UDP, or over TCP with its length prefix).

    :param qname: a query name or glob (``*.example.com``), or a list of them,
        compared case-insensitively; ``None``: any name.
    """

    qname: tuple[str, ...] | None = attrs.field(default=None, converter=_names)
    name: str = attrs.field(default="dns", kw_only=True)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        if is_datagram(info):
            grams = getattr(info, "datagrams", ()) or (data,)
            verdict, qname = parse_question(grams[0], complete=True)
        else:
            if len(data) >= 2 and int.from_bytes(data[:2], "big") < _HEADER + 5:
                return NO_MATCH
            length = int.from_bytes(data[:2], "big") if len(data) >= 2 else 0
            message = data[2 : 2 + length]
            verdict, qname = parse_question(message, complete=len(data) >= 2 and len(message) == length)
        if qname is None:
            return verdict
        if self.qname is not None and not any(fnmatch.fnmatchcase(qname, g) for g in self.qname):
            return NO_MATCH
        return MATCH
