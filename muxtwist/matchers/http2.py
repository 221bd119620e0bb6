"""
HTTP/2 with prior knowledge: the client connection preface, and the first
request's header block decoded with ``hpack``, for :class:`HTTP2Header` and
:class:`GRPC`.

Bytes read: :class:`HTTP2` reads the 24-byte preface only. The header
matchers read on, frame by frame: the client's SETTINGS (which must come
first), any SETTINGS, PING, PRIORITY, WINDOW_UPDATE or extension frames, then
the first HEADERS frame and its CONTINUATION frames, and decide on the
decoded header list. NEED_MORE bound: ``MAX_SCAN`` bytes; a header block not
complete within them is NO_MATCH, as are frames longer than the default
SETTINGS_MAX_FRAME_SIZE (16384) and frames a client may not send first.

Clients that wait for the server's SETTINGS before sending HEADERS (as
grpc-java does) would stall: the header matchers are
:class:`~muxtwist.interfaces.IRespondingMatcher`, so once the client's
preface and SETTINGS are in without HEADERS, the sniffer writes one empty
SETTINGS frame for them, and the client's ACK of it is removed from the
bytes replayed to the real server, which never sent that frame. A client that
sent its HEADERS before that frame reached it (curl, h2load) acks it after
them: the sniffer waits for that ACK before handing off, so it never reaches
the real server (nghttp2 servers end the connection on an ACK of SETTINGS
they did not send).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from hpack import Decoder
from zope.interface import implementer

from muxtwist._rules import needs_bytes
from muxtwist.interfaces import ConnectionInfo, IMatcher, IRespondingMatcher, Verdict
from muxtwist.matchers import _options

__all__ = ["GRPC", "HTTP2", "MAX_SCAN", "PREFACE", "SETTINGS_FRAME", "HTTP2Header", "first_headers"]

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: An empty SETTINGS frame: it announces the protocol defaults, so a client
#: acting on it, or an ACK of it reaching the real server, changes nothing.
SETTINGS_FRAME = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
MAX_SCAN = 16384

_MAX_FRAME = 16384
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS = 0, 1, 2, 3, 4
_PUSH_PROMISE, _GOAWAY, _CONTINUATION = 5, 7, 9
_FORBIDDEN_BEFORE_HEADERS = frozenset({_DATA, _RST_STREAM, _PUSH_PROMISE, _GOAWAY})
_END_HEADERS, _PADDED, _PRIORITY_FLAG, _ACK = 0x4, 0x8, 0x20, 0x1


def _preface(data: bytes) -> Verdict:
    if len(data) < len(PREFACE):
        return NEED_MORE if PREFACE.startswith(data) else NO_MATCH
    return MATCH if data.startswith(PREFACE) else NO_MATCH


@attrs.frozen
class _Scan:
    verdict: Verdict
    block: bytes = b""
    settings_seen: bool = False
    headers_started: bool = False


def _scan(data: bytes) -> _Scan:
    """Find the first complete header block within ``MAX_SCAN`` bytes."""
    verdict = _preface(data)
    if verdict is not MATCH:
        return _Scan(verdict)
    view = data[:MAX_SCAN]
    short = len(data) < MAX_SCAN
    pos = len(PREFACE)
    parts: list[bytes] = []
    stream = 0  # the stream whose header block is being collected
    settings_seen = False
    while True:
        if pos + 9 > len(view):
            return _Scan(NEED_MORE if short else NO_MATCH, settings_seen=settings_seen, headers_started=bool(stream))
        length = int.from_bytes(view[pos : pos + 3], "big")
        kind, flags = view[pos + 3], view[pos + 4]
        sid = int.from_bytes(view[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        if length > _MAX_FRAME:
            return _Scan(NO_MATCH)
        if not settings_seen and (kind != _SETTINGS or sid or flags & _ACK or length % 6):
            return _Scan(NO_MATCH)
        if stream and (kind != _CONTINUATION or sid != stream):
            return _Scan(NO_MATCH)
        if kind in _FORBIDDEN_BEFORE_HEADERS or (kind == _CONTINUATION and not stream):
            return _Scan(NO_MATCH)
        if kind == _HEADERS and (sid == 0 or sid % 2 == 0):
            return _Scan(NO_MATCH)
        end = pos + 9 + length
        if end > len(view):
            started = bool(stream) or kind == _HEADERS
            return _Scan(NEED_MORE if short else NO_MATCH, settings_seen=settings_seen, headers_started=started)
        payload = view[pos + 9 : end]
        pos = end
        settings_seen = True
        if kind == _HEADERS:
            if flags & _PADDED:
                if not payload or payload[0] > len(payload) - 1:
                    return _Scan(NO_MATCH)
                payload = payload[1 : len(payload) - payload[0]]
            if flags & _PRIORITY_FLAG:
                if len(payload) < 5:
                    return _Scan(NO_MATCH)
                payload = payload[5:]
            stream = sid
        if kind in (_HEADERS, _CONTINUATION):
            parts.append(payload)
            if flags & _END_HEADERS:
                return _Scan(MATCH, b"".join(parts), True, True)


def first_headers(data: bytes) -> tuple[Verdict, tuple[tuple[str, str], ...] | None]:
    """
    Decode the first request's headers from an HTTP/2 prior-knowledge stream.

    (MATCH, headers) with names and values as latin-1 text, pseudo-headers
    (``:path``, ``:authority``) included; (NEED_MORE, None) while the block
    may still arrive within ``MAX_SCAN`` bytes; (NO_MATCH, None) otherwise,
    an undecodable block included. Never raises.
    """
    scan = _scan(data)
    if scan.verdict is not MATCH:
        return scan.verdict, None
    try:
        raw = Decoder().decode(scan.block, raw=True)
    except Exception:
        # hpack raises its own errors for bad blocks, and may let others
        # through on adversarial input; either way this is not a request.
        return NO_MATCH, None
    return MATCH, tuple((bytes(k).decode("latin-1"), bytes(v).decode("latin-1")) for k, v in raw)


def _strip_ack(data: bytes) -> bytes:
    """``data`` without the first SETTINGS ACK frame after the preface."""
    if not data.startswith(PREFACE):
        return data
    pos = len(PREFACE)
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        if data[pos + 3] == _SETTINGS and data[pos + 4] & _ACK and length == 0:
            return data[:pos] + data[pos + 9 :]
        pos += 9 + length
    return data


def _lower(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"HTTP2Header header must be a str header name, got {_options.describe(value)}")
    if not value:
        raise ValueError("HTTP2Header header must be a header name, got ''")
    return value.lower()


class _AnswersSettings:
    """The IRespondingMatcher half shared by the header matchers."""

    def respond(self, data: bytes, info: ConnectionInfo) -> bytes:
        scan = _scan(data)
        if scan.verdict is NEED_MORE and scan.settings_seen and not scan.headers_started:
            return SETTINGS_FRAME
        return b""

    def filter_replay(self, data: bytes) -> bytes:
        return _strip_ack(data)


@needs_bytes
@implementer(IMatcher)
@attrs.frozen
class HTTP2:
    """The HTTP/2 prior-knowledge client preface (``PRI * HTTP/2.0...``); decides within 24 bytes."""

    name: str = attrs.field(default="http2", kw_only=True, validator=_options.check_name)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        return _preface(data)


@implementer(IRespondingMatcher)
@attrs.frozen
class HTTP2Header(_AnswersSettings):
    """
    An HTTP/2 prior-knowledge connection whose first request has a header.

    :param header: the header name, case-insensitive; pseudo-headers such as
        ``:path`` and ``:authority`` work too.
    :param value: the exact value wanted; ``None`` for any.
    :param prefix: a prefix the value must start with; ``None`` for any.
    """

    header: str = attrs.field(converter=_lower)
    value: str | None = attrs.field(default=None, validator=_options.text_or_none("HTTP2Header", "value"))
    prefix: str | None = attrs.field(default=None, validator=_options.text_or_none("HTTP2Header", "prefix"))
    name: str = attrs.field(default="http2_header", kw_only=True, validator=_options.check_name)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        return _any_header(data, self._wanted)

    def _wanted(self, k: str, v: str) -> bool:
        return (
            k.lower() == self.header
            and (self.value is None or v == self.value)
            and (self.prefix is None or v.startswith(self.prefix))
        )


@implementer(IRespondingMatcher)
@attrs.frozen
class GRPC(_AnswersSettings):
    """An HTTP/2 prior-knowledge connection whose first request has ``content-type: application/grpc*``."""

    name: str = attrs.field(default="grpc", kw_only=True, validator=_options.check_name)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        return _any_header(data, _is_grpc)


def _is_grpc(k: str, v: str) -> bool:
    return k == "content-type" and v.lower().startswith("application/grpc")


def _any_header(data: bytes, wanted: Callable[[str, str], bool]) -> Verdict:
    """MATCH when a header of the first request is ``wanted``; NEED_MORE until those headers are complete."""
    verdict, headers = first_headers(data)
    if headers is None:
        return verdict
    return MATCH if any(wanted(k, v) for k, v in headers) else NO_MATCH
