"""
WebSocket: the HTTP/1.1 opening handshake (RFC 6455), a ``GET`` whose head
asks to upgrade to ``websocket``.

Bytes read: the request head up to its blank line, parsed by
:func:`~muxtwist.matchers.http.parse_request_head`. ``Connection`` and
``Upgrade`` are lists that a client may split over several lines
(``Connection: keep-alive`` then ``Connection: Upgrade``); every line counts. NO_MATCH at the first
byte that cannot start ``GET``; NEED_MORE bound: ``MAX_HEAD`` bytes of head.
"""

from __future__ import annotations

import fnmatch

import attrs
from zope.interface import implementer

from muxtwist._rules import needs_bytes
from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers import _options
from muxtwist.matchers.http import RequestHead, parse_request_head

__all__ = ["WebSocket", "is_websocket_handshake"]

MATCH, NO_MATCH = Verdict.MATCH, Verdict.NO_MATCH

_GET = frozenset({b"GET"})


def _tokens(head: RequestHead, name: bytes) -> set[bytes]:
    """The tokens of a list-valued header, over all its lines (RFC 9110 section 5.3 lets a client split it)."""
    return {t.strip(b" \t").lower() for value in head.header_values(name) for t in value.split(b",")}


def is_websocket_handshake(head: RequestHead) -> bool:
    """Whether a request head is a WebSocket opening handshake: GET, HTTP/1.1, Upgrade and Connection, a key."""
    return (
        head.method == b"GET"
        and head.version.strip() == b"HTTP/1.1"
        and b"websocket" in _tokens(head, b"upgrade")
        and b"upgrade" in _tokens(head, b"connection")
        and bool(head.header(b"sec-websocket-key"))
    )


_paths = _options.strings("WebSocket", "path", _options.path_glob)


def _globs(value: object) -> tuple[str, ...] | None:
    return _paths(value)


@needs_bytes
@implementer(IMatcher)
@attrs.frozen
class WebSocket:
    """
    A WebSocket opening handshake.

    :param path: a path or glob (``/ws/*``), or a list, compared with the
        request path (query ignored).
    """

    path: tuple[str, ...] | None = attrs.field(default=None, converter=_globs)
    name: str = attrs.field(default="websocket", kw_only=True, validator=_options.check_name)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        verdict, head = parse_request_head(data, _GET)
        if head is None:
            return verdict
        if not is_websocket_handshake(head):
            return NO_MATCH
        if self.path is not None:
            path = head.path
            if path is None or not any(fnmatch.fnmatchcase(path, g) for g in self.path):
                return NO_MATCH
        return MATCH
