"""
Redis: a RESP command array (``*<n>\\r\\n$<len>\\r\\n<name>\\r\\n``) or an
inline command (``PING\\r\\n``, ``AUTH secret\\r\\n``, ...).

Bytes read: for RESP, the array header, the first bulk string's header and
the command name it holds (NEED_MORE bound: ``MAX_PREFIX`` bytes). For inline
commands, the first word, and then the rest of the line unless the word ends
the line. Inline words are limited to commands a client opens a connection
with and that no other protocol here starts with (``GET``/``SET`` are left
out: ``GET /`` is HTTP). As ordinary text starts with such words too
(``hello world``, ``Info please``), an inline command is taken only in the
shape Redis itself accepts: the word all upper or all lower case, and the
arguments as many and of the kind the command takes (``HELLO`` wants a
protocol version, ``SELECT`` a number, ``QUIT`` nothing). NEED_MORE bound for
an inline line: ``MAX_INLINE`` bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import attrs
from zope.interface import implementer

from muxtwist._rules import needs_bytes
from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers import _options

__all__ = ["INLINE_COMMANDS", "MAX_INLINE", "MAX_PREFIX", "Redis"]

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

#: Enough for ``*`` + 7 digits + CRLF, ``$`` + 2 digits + CRLF, a 32-byte name and CRLF.
MAX_PREFIX = 64
_MAX_NAME = 32
_MAX_ARGS = 1_048_576

_Args = list[bytes]


def _count(low: int, high: int | None = None) -> Callable[[_Args], bool]:
    return lambda args: low <= len(args) and (high is None or len(args) <= high)


def _one_of(low: int, high: int | None, first: str) -> Callable[[_Args], bool]:
    words = frozenset(first.encode().split())
    return lambda args: _count(low, high)(args) and (not args or args[0].upper() in words)


def _hello(args: _Args) -> bool:
    """``HELLO [protover [AUTH username password] [SETNAME clientname]]``."""
    if not args:
        return True
    if not args[0].isdigit():
        return False
    rest = [a.upper() for a in args[1:]]
    while rest:
        if rest[0] == b"AUTH" and len(rest) >= 3:
            rest = rest[3:]
        elif rest[0] == b"SETNAME" and len(rest) >= 2:
            rest = rest[2:]
        else:
            return False
    return True


_INFO_SECTIONS = frozenset(
    b"server clients memory persistence stats replication cpu commandstats latencystats sentinel cluster "
    b"modules keyspace errorstats all default everything".split()
)

#: Inline command -> what its arguments must look like.
_INLINE_ARGS: dict[bytes, Callable[[_Args], bool]] = {
    b"PING": _count(0, 1),
    b"AUTH": _count(1, 2),
    b"HELLO": _hello,
    b"ECHO": _count(1, 1),
    b"SELECT": lambda args: len(args) == 1 and args[0].isdigit(),
    b"INFO": lambda args: all(a.lower() in _INFO_SECTIONS for a in args),
    b"QUIT": _count(0, 0),
    b"COMMAND": _one_of(0, None, "COUNT DOCS GETKEYS GETKEYSANDFLAGS INFO LIST HELP"),
    b"CLIENT": _one_of(
        1,
        None,
        "ID INFO LIST SETNAME GETNAME KILL PAUSE UNPAUSE REPLY TRACKING TRACKINGINFO CACHING GETREDIR "
        "NO-EVICT NO-TOUCH SETINFO UNBLOCK HELP",
    ),
    b"DBSIZE": _count(0, 0),
    b"MONITOR": _count(0, 0),
    b"SUBSCRIBE": _count(1),
    b"PSUBSCRIBE": _count(1),
    b"KEYS": _count(1, 1),
    b"EXISTS": _count(1),
    b"INCR": _count(1, 1),
    b"DECR": _count(1, 1),
    b"LPUSH": _count(2),
    b"RPUSH": _count(2),
    b"HGET": _count(2, 2),
    b"HSET": lambda args: len(args) >= 3 and len(args) % 2 == 1,
    b"MGET": _count(1),
    b"MSET": lambda args: len(args) >= 2 and len(args) % 2 == 0,
    b"FLUSHALL": _one_of(0, 1, "ASYNC SYNC"),
    b"FLUSHDB": _one_of(0, 1, "ASYNC SYNC"),
    b"CONFIG": _one_of(1, None, "GET SET RESETSTAT REWRITE HELP"),
}
INLINE_COMMANDS: frozenset[bytes] = frozenset(_INLINE_ARGS)
#: The longest inline command line waited for.
MAX_INLINE = 1024
_LONGEST_INLINE = max(len(c) for c in INLINE_COMMANDS)
_INLINE_PREFIXES = frozenset(c[:i] for c in INLINE_COMMANDS for i in range(1, len(c) + 1))
# Redis splits an inline line at spaces and tabs alike (sdssplitargs).
_WORD = re.compile(rb"[^ \t\r\n]*")
_NAME = re.compile(rb"[A-Za-z][A-Za-z|_.-]*\Z")
# An argument as Redis splits an inline line: a double-quoted string with
# escapes, a single-quoted string, or a run of non-blank bytes.
_ARG = re.compile(rb"""[ \t]*("(?:\\.|[^"\\])*"|'[^']*'|[^ \t]+)""")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


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


def _split(line: bytes) -> _Args | None:
    """The arguments of an inline line, or ``None`` if it does not split as Redis splits it."""
    args: _Args = []
    pos = 0
    while pos < len(line):
        found = _ARG.match(line, pos)
        if found is None:
            return None if line[pos:].strip(b" \t") else args
        args.append(found.group(1))
        pos = found.end()
    return args


def _cased(word: bytes) -> bool:
    """A command typed to Redis is all upper or all lower case; ``Hello`` is the start of a sentence."""
    return word.isupper() or word.islower()


def _inline(data: bytes) -> Verdict:
    word = data[: _LONGEST_INLINE + 1]
    end = _WORD.match(word).end()  # type: ignore[union-attr]
    if end == len(word):  # the word has not ended within reach
        if len(word) > _LONGEST_INLINE or not _cased(word):
            return NO_MATCH
        return NEED_MORE if word.upper() in _INLINE_PREFIXES else NO_MATCH
    command = word[:end]
    if not end or not _cased(command) or command.upper() not in INLINE_COMMANDS:
        return NO_MATCH
    accepts = _INLINE_ARGS[command.upper()]
    if word[end] not in b" \t":  # CR or LF: a command without arguments, decided now
        return MATCH if accepts([]) else NO_MATCH
    line_end = data.find(b"\n", end, MAX_INLINE)
    if line_end < 0:
        return NO_MATCH if len(data) >= MAX_INLINE else NEED_MORE
    line = data[end:line_end].removesuffix(b"\r")
    if _CONTROL.search(line):
        return NO_MATCH
    args = _split(line)
    return MATCH if args is not None and accepts(args) else NO_MATCH


@needs_bytes
@implementer(IMatcher)
@attrs.frozen
class Redis:
    """A Redis client's first command, in RESP or inline form."""

    name: str = attrs.field(default="redis", kw_only=True, validator=_options.check_name)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        if not data:
            return NEED_MORE
        if data[0] == 42:  # "*"
            return _resp(data)
        return _inline(data)
