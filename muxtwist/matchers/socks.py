"""
SOCKS: a SOCKS4 or SOCKS4a request, and a SOCKS5 greeting.

Bytes read: SOCKS4(a), the whole request: version 4, command CONNECT or
BIND, port, address, a NUL-terminated user id and, for 4a (address
``0.0.0.x``, x not 0), a NUL-terminated host name of printable ASCII.
NEED_MORE bound: ``MAX_SOCKS4`` bytes. SOCKS5, the whole greeting: version
5, 1-255 methods, none of them 0xFF ("no acceptable methods"); the client
waits for the server's choice after it, so this is all there is to see.
NEED_MORE bound: 257 bytes.
"""

from __future__ import annotations

import re

import attrs
from zope.interface import implementer

from muxtwist._rules import needs_bytes
from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers import _options

__all__ = ["MAX_SOCKS4", "SOCKS4", "SOCKS5"]

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

_MAX_FIELD = 255
MAX_SOCKS4 = 8 + 2 * (_MAX_FIELD + 1)
_HOST = re.compile(rb"[\x21-\x7e]*\Z")


def _cstring(data: bytes, start: int) -> tuple[Verdict, int]:
    """A NUL-terminated field at ``start`` of at most ``_MAX_FIELD`` bytes: (MATCH, end) or a verdict."""
    end = data.find(b"\x00", start, start + _MAX_FIELD + 1)
    if end >= 0:
        return MATCH, end
    return (NO_MATCH if len(data) > start + _MAX_FIELD else NEED_MORE), 0


@needs_bytes
@implementer(IMatcher)
@attrs.frozen
class SOCKS4:
    """
    A SOCKS4 or SOCKS4a CONNECT/BIND request.

    :param allow_4a: also accept SOCKS4a requests that carry a host name.
    """

    allow_4a: bool = attrs.field(default=True, validator=_options.boolean("SOCKS4", "allow_4a"))
    name: str = attrs.field(default="socks4", kw_only=True, validator=_options.check_name)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        if not data:
            return NEED_MORE
        if data[0] != 4 or (len(data) > 1 and data[1] not in (1, 2)):
            return NO_MATCH
        if len(data) < 8:
            return NEED_MORE
        address = data[4:8]
        is_4a = address[:3] == b"\x00\x00\x00"
        if address == b"\x00\x00\x00\x00" or (is_4a and not self.allow_4a):
            return NO_MATCH
        verdict, end = _cstring(data, 8)
        if verdict is not MATCH or not is_4a:
            return verdict
        verdict, host_end = _cstring(data, end + 1)
        if verdict is NO_MATCH or not _HOST.match(data[end + 1 : end + 2 + _MAX_FIELD].split(b"\x00", 1)[0]):
            return NO_MATCH
        if verdict is NEED_MORE:
            return NEED_MORE
        return MATCH if host_end > end + 1 else NO_MATCH


@needs_bytes
@implementer(IMatcher)
@attrs.frozen
class SOCKS5:
    """A SOCKS5 greeting: version 5 and the authentication methods offered."""

    name: str = attrs.field(default="socks5", kw_only=True, validator=_options.check_name)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        if not data:
            return NEED_MORE
        if data[0] != 5:
            return NO_MATCH
        if len(data) < 2:
            return NEED_MORE
        count = data[1]
        methods = data[2 : 2 + count]
        if count == 0 or b"\xff" in methods:
            return NO_MATCH
        return NEED_MORE if len(methods) < count else MATCH
