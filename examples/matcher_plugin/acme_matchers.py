"""
A third-party matcher: the memcached text protocol.

A matcher is a pure function of the bytes buffered so far: no sockets, no
clock, no state, so a unit test is one line. It says NEED_MORE while the
buffer could still become a command it knows, and must never change its
mind once it has said MATCH or NO_MATCH.
"""

from __future__ import annotations

import attrs
from zope.interface import implementer

from muxtwist import ConnectionInfo, IMatcher, Verdict

#: The commands a memcached client opens with (the text and meta protocols).
COMMANDS = frozenset(
    b"get gets gat gats set add replace append prepend cas delete incr decr touch "
    b"stats version verbosity flush_all quit mg ms md ma mn me".split()
)
_LONGEST = max(len(c) for c in COMMANDS)


@implementer(IMatcher)
@attrs.frozen
class Memcached:
    """
    A memcached text-protocol command: a known command word followed by a
    space or the end of the line. Reads at most 10 bytes.
    """

    name: str = attrs.field(default="memcached", kw_only=True)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        head = data[: _LONGEST + 1]
        for i, byte in enumerate(head):
            if byte in b" \r\n":
                return Verdict.MATCH if head[:i] in COMMANDS else Verdict.NO_MATCH
        if len(head) > _LONGEST or not any(c.startswith(head) for c in COMMANDS):
            return Verdict.NO_MATCH
        return Verdict.NEED_MORE
