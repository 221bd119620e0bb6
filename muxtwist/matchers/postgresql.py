"""
PostgreSQL: the first message of a frontend, one of StartupMessage (protocol
3.x), SSLRequest, GSSENCRequest and CancelRequest.

Bytes read: the Int32 length and the Int32 code that open each of them; for
a StartupMessage, the whole message, whose parameters must be well-formed
NUL-terminated pairs including ``user``. NEED_MORE bound: the declared
length, at most ``MAX_STARTUP`` (10000, the server's own limit) bytes;
SSLRequest, GSSENCRequest and CancelRequest decide within 8 bytes.
"""

from __future__ import annotations

import re

import attrs
from zope.interface import implementer

from muxtwist._rules import needs_bytes
from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers import _options

__all__ = ["MAX_STARTUP", "PostgreSQL"]

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

MAX_STARTUP = 10000
_SSL_REQUEST = (80877103).to_bytes(4, "big")
_GSSENC_REQUEST = (80877104).to_bytes(4, "big")
_CANCEL_REQUEST = (80877102).to_bytes(4, "big")
_KEY = re.compile(rb"[\x21-\x7e]+\Z")


def _code_ok(length: int, code: bytes) -> bool:
    """Whether ``code`` (possibly partial) can open a message of ``length`` bytes."""
    if length == 8:
        return _SSL_REQUEST.startswith(code) or _GSSENC_REQUEST.startswith(code)
    if _CANCEL_REQUEST.startswith(code) and 16 <= length <= 12 + 256:
        return True
    # StartupMessage: protocol major 3, minor 0-9 (3.2 is PostgreSQL 18's).
    return b"\x00\x03\x00".startswith(code[:3]) and (len(code) < 4 or code[3] <= 9)


def _startup(body: bytes) -> bool:
    if not body.endswith(b"\x00\x00"):
        return False
    items = body[:-2].split(b"\x00")
    if len(items) % 2:
        return False
    keys = items[0::2]
    return b"user" in keys and all(_KEY.match(k) for k in keys)


@needs_bytes
@implementer(IMatcher)
@attrs.frozen
class PostgreSQL:
    """A PostgreSQL client's first message: startup, SSL or GSS encryption request, or cancel."""

    name: str = attrs.field(default="postgresql", kw_only=True, validator=_options.check_name)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        if data[:2].strip(b"\x00"):
            return NO_MATCH
        if len(data) < 4:
            return NEED_MORE
        length = int.from_bytes(data[:4], "big")
        if length < 8 or length > MAX_STARTUP:
            return NO_MATCH
        code = data[4:8]
        if not _code_ok(length, code):
            return NO_MATCH
        if len(code) < 4:
            return NEED_MORE
        if code[:2] != b"\x00\x03":
            return MATCH
        if len(data) < length:
            return NEED_MORE
        return MATCH if _startup(data[8:length]) else NO_MATCH
