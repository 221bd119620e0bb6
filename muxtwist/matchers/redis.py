"""
Redis: a RESP command array (``*<n>\\r\\n$<len>\\r\\n<name>\\r\\n``) or an
inline command (``PING\\r\\n``, ``AUTH secret\\r\\n``, ...).

Bytes read: for RESP, the array header, the first bulk string's header and
the command name it holds; for inline commands, the first word and the byte
after it. NEED_MORE bound: ``MAX_PREFIX`` bytes. Inline words are limited to
commands a client opens a connection with and that no other protocol here
starts with (``GET``/``SET`` are left out: ``GET /`` is HTTP).
"""

from __future__ import annotations

import re

import attrs
from zope.interface import implementer

from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict

__all__ = ["INLINE_COMMANDS", "MAX_PREFIX", "Redis"]

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

#: Enough for ``*`` + 7 digits + CRLF, ``$`` + 2 digits + CRLF, a 32-byte name and CRLF.
MAX_PREFIX = 64
_MAX_NAME = 32
_MAX_ARGS = 1_048_576

INLINE_COMMANDS: frozenset[bytes] = frozenset(
    b"PING AUTH HELLO ECHO SELECT INFO QUIT COMMAND CLIENT DBSIZE MONITOR SUBSCRIBE PSUBSCRIBE "
    b"KEYS EXISTS INCR DECR LPUSH RPUSH HGET HSET MGET MSET FLUSHALL FLUSHDB CONFIG".split()
)
_LONGEST_INLINE = max(len(c) for c in INLINE_COMMANDS)
_INLINE_PREFIXES = frozenset(c[:i] for c in INLINE_COMMANDS for i in range(1, len(c) + 1))
_WORD = re.compile(rb"[^ \r\n]*")
_NAME = re.compile(rb"[A-Za-z][A-Za-z|_.-]*\Z")


def _number(data: bytes, start: int, limit: int) -> tuple[Verdict, int, int]:
    """Read ``digits CRLF`` at ``start``: (MATCH, value, next), (NEED_MORE, 0, 0) or (NO_MATCH, 0, 0)."""
    end = start
    size = len(data)
    while end < size and 48 <= data[end] <= 57 and end - start <= 7:
        end += 1
    if end == size:
        return (NEED_MORE if end - start <= 7 else NO_MATCH), 0, 0
    if end == start or end - start > 7 or data[end] != 13:
        return NO_MATCH, 0, 0
    value = int(data[start:end])
    if data[start] == 48 or value > limit:
        return NO_MATCH, 0, 0
    if end + 1 == size:
        return NEED_MORE, 0, 0
    if data[end + 1] != 10:
        return NO_MATCH, 0, 0
    return MATCH, value, end + 2


def _resp(data: bytes) -> Verdict:
    verdict, _count, pos = _number(data, 1, _MAX_ARGS)
    if verdict is not MATCH:
        return verdict
    if pos == len(data):
        return NEED_MORE
    if data[pos] != 36:  # "$": commands are arrays of bulk strings
        return NO_MATCH
    verdict, length, pos = _number(data, pos + 1, _MAX_NAME)
    if verdict is not MATCH:
        return verdict
    name = data[pos : pos + length]
    if name and not _NAME.match(name):
        return NO_MATCH
    if len(data) < pos + length + 2:
        tail = data[pos + length : pos + length + 2]
        return NEED_MORE if b"\r\n".startswith(tail) else NO_MATCH
    return MATCH if data[pos + length : pos + length + 2] == b"\r\n" else NO_MATCH


def _inline(data: bytes) -> Verdict:
    word = data[: _LONGEST_INLINE + 1]
    end = _WORD.match(word).end()  # type: ignore[union-attr]
    if end < len(word):  # the word ends within reach
        return MATCH if end and word[:end].upper() in INLINE_COMMANDS else NO_MATCH
    if len(word) > _LONGEST_INLINE:
        return NO_MATCH
    return NEED_MORE if word.upper() in _INLINE_PREFIXES else NO_MATCH


@implementer(IMatcher)
@attrs.frozen
class Redis:
    """A Redis client's first command, in RESP or inline form."""

    name: str = attrs.field(default="redis", kw_only=True)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        if not data:
            return NEED_MORE
        if data[0] == 42:  # "*"
            return _resp(data)
        return _inline(data)
