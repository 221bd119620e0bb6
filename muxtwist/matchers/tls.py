"""
TLS: a ClientHello parser that reassembles the handshake message across TLS
records and any TCP split, and the :class:`TLS` matcher built on it.

Bytes read: TLS records of content type 22 (handshake) from the first byte,
concatenated until the whole ClientHello handshake message is there.
NEED_MORE bound: the ClientHello's own declared length plus 5 bytes of record
header per record; a ClientHello declaring more than ``MAX_CLIENT_HELLO``
bytes is NO_MATCH, and so is one spread over more than ``MAX_RECORDS``
records. Records longer than 2^14 bytes, other content types, other
handshake messages, SSLv2-style hellos and every structural error are
NO_MATCH.
"""

from __future__ import annotations

import array
import fnmatch
import sys
from collections.abc import Iterable

import attrs
from zope.interface import implementer

from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict

__all__ = ["MAX_CLIENT_HELLO", "MAX_RECORDS", "TLS", "TLS_VERSIONS", "ClientHello", "parse_client_hello"]

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

#: The largest ClientHello body accepted. Post-quantum key shares make real
#: hellos 2-8 KiB; nothing legitimate comes near this.
MAX_CLIENT_HELLO = 65536
_MAX_RECORD = 1 << 14
#: The most records a ClientHello may be spread over. Real clients use one,
#: or two past 16 KiB; the cap keeps a hello sent in 1-byte records from
#: costing a parse of thousands of records on every new chunk.
MAX_RECORDS = 64
# legacy_version 2 + random 32 + session id length 1 + one cipher suite with
# its length 4 + one compression method with its length 2.
_MIN_CLIENT_HELLO = 41

#: Version names accepted by ``min_version``.
TLS_VERSIONS: dict[str, int] = {
    "SSLv3": 0x0300,
    "TLSv1": 0x0301,
    "TLSv1.0": 0x0301,
    "TLSv1.1": 0x0302,
    "TLSv1.2": 0x0303,
    "TLSv1.3": 0x0304,
}

_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43


def _uint16s(raw: bytes) -> tuple[int, ...]:
    """Big-endian 16-bit integers, without a Python loop per value."""
    values = array.array("H", raw[: len(raw) // 2 * 2])
    if sys.byteorder == "little":
        values.byteswap()
    return tuple(values)


def _is_grease(value: int) -> bool:
    """RFC 8701 values (0x0a0a, 0x1a1a, ...) that clients send to keep servers honest."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


@attrs.frozen
class ClientHello:
    """
    What a ClientHello offers, for rules and logs.

    :ivar legacy_version: the ``legacy_version`` field (0x0303 for TLS 1.2 and 1.3).
    :ivar versions: the versions offered, highest first as the client listed
        them: from ``supported_versions`` when present (GREASE removed),
        else ``(legacy_version,)``.
    :ivar sni: the host name asked for, lower-cased, or ``None``.
    :ivar alpn: the ALPN protocols offered, in order.
    :ivar cipher_suites: the cipher suites offered (GREASE removed).
    :ivar extensions: the extension types, in order.
    :ivar size: the ClientHello body's length in bytes.
    """

    legacy_version: int
    versions: tuple[int, ...]
    sni: str | None
    alpn: tuple[str, ...]
    cipher_suites: tuple[int, ...]
    extensions: tuple[int, ...]
    size: int

    @property
    def max_version(self) -> int:
        """The highest version offered."""
        return max(self.versions, default=self.legacy_version)


class _Malformed(Exception):
    pass


def _handshake(data: bytes) -> tuple[Verdict, bytes]:
    """
    Reassemble the first handshake message from the records at the start of
    ``data``: (MATCH, body) when complete, (NEED_MORE, b"") or (NO_MATCH, b"").
    """
    fragments: list[bytes] = []
    have = 0
    need = -1  # the body length, once the 4-byte handshake header is known
    pos = 0
    size = len(data)
    while True:
        if pos >= size:
            return NEED_MORE, b""
        if len(fragments) >= MAX_RECORDS or data[pos] != 22:
            return NO_MATCH, b""
        if pos + 1 < size and data[pos + 1] != 3:
            return NO_MATCH, b""
        if pos + 2 < size and data[pos + 2] > 4:
            return NO_MATCH, b""
        if pos + 5 > size:
            return NEED_MORE, b""
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if length == 0 or length > _MAX_RECORD:
            return NO_MATCH, b""
        fragment = data[pos + 5 : pos + 5 + length]
        if not fragments and fragment and fragment[0] != 1:
            return NO_MATCH, b""
        fragments.append(fragment)
        have += len(fragment)
        if need < 0 and have >= 4:
            head = b"".join(fragments)
            if head[0] != 1:
                return NO_MATCH, b""
            need = int.from_bytes(head[1:4], "big")
            if need < _MIN_CLIENT_HELLO or need > MAX_CLIENT_HELLO:
                return NO_MATCH, b""
        if need >= 0 and have >= need + 4:
            return MATCH, b"".join(fragments)[4 : 4 + need]
        if len(fragment) < length:
            return NEED_MORE, b""
        pos += 5 + length


class _Reader:
    """Bounds-checked reads from one ClientHello body; any overrun is malformed."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def take(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise _Malformed()
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> _Reader:
        n = self.uint(length_bytes)
        start = self.pos
        self.take(n)
        return _Reader(self.data, start, start + n)

    @property
    def left(self) -> int:
        return self.end - self.pos


def _server_name(ext: _Reader) -> str | None:
    names = ext.vector(2)
    if ext.left or not names.left:
        raise _Malformed()
    found: str | None = None
    while names.left:
        kind = names.uint(1)
        name = names.vector(2)
        if kind == 0 and found is None:
            raw = name.take(name.left)
            if not raw:
                raise _Malformed()
            try:
                found = raw.decode("ascii").rstrip(".").lower()
            except UnicodeDecodeError:
                raise _Malformed() from None
    return found


def _alpn(ext: _Reader) -> tuple[str, ...]:
    protocols = ext.vector(2)
    if ext.left or not protocols.left:
        raise _Malformed()
    out = []
    while protocols.left:
        proto = protocols.vector(1)
        if not proto.left:
            raise _Malformed()
        out.append(proto.take(proto.left).decode("latin-1"))
    return tuple(out)


def _supported_versions(ext: _Reader) -> tuple[int, ...]:
    versions = ext.vector(1)
    if ext.left or not versions.left or versions.left % 2:
        raise _Malformed()
    return tuple(v for v in _uint16s(versions.take(versions.left)) if not _is_grease(v))


def _parse_body(body: bytes) -> ClientHello:
    r = _Reader(body)
    legacy_version = r.uint(2)
    if legacy_version >> 8 != 3 or legacy_version & 0xFF > 4:
        raise _Malformed()
    r.take(32)
    session_id = r.vector(1)
    if session_id.left > 32:
        raise _Malformed()
    suites = r.vector(2)
    if not suites.left or suites.left % 2:
        raise _Malformed()
    cipher_suites = tuple(s for s in _uint16s(suites.take(suites.left)) if s & 0x0F0F != 0x0A0A)
    if not r.vector(1).left:
        raise _Malformed()
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] | None = None
    types: list[int] = []
    if r.left:
        extensions = r.vector(2)
        if r.left:
            raise _Malformed()
        while extensions.left:
            kind = extensions.uint(2)
            ext = extensions.vector(2)
            if kind in types:
                raise _Malformed()
            types.append(kind)
            if kind == _EXT_SERVER_NAME:
                sni = _server_name(ext)
            elif kind == _EXT_ALPN:
                alpn = _alpn(ext)
            elif kind == _EXT_SUPPORTED_VERSIONS:
                versions = _supported_versions(ext)
    return ClientHello(
        legacy_version=legacy_version,
        versions=versions if versions else (legacy_version,),
        sni=sni,
        alpn=alpn,
        cipher_suites=cipher_suites,
        extensions=tuple(types),
        size=len(body),
    )


def parse_client_hello(data: bytes) -> tuple[Verdict, ClientHello | None]:
    """
    Parse the TLS ClientHello at the start of ``data``.

    (MATCH, hello) once the whole handshake message has arrived and is well
    formed; (NEED_MORE, None) while it is still coming; (NO_MATCH, None) for
    anything else. Never raises.
    """
    verdict, body = _handshake(data)
    if verdict is not MATCH:
        return verdict, None
    try:
        return MATCH, _parse_body(body)
    except _Malformed:
        return NO_MATCH, None


def _names(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    values = (value,) if isinstance(value, str) else tuple(value)
    return tuple(v.lower().rstrip(".") for v in values)


def _protocols(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


def _version(value: str | int | None) -> int | None:
    if value is None or isinstance(value, int):
        return value
    try:
        return TLS_VERSIONS[value]
    except KeyError:
        raise ValueError(f"unknown TLS version {value!r}; use one of {', '.join(TLS_VERSIONS)}") from None


@implementer(IMatcher)
@attrs.frozen
class TLS:
    """
    A TLS ClientHello, reassembled across records.

    :param sni: a host name or glob (``*.example.com``), or a list of them,
        compared case-insensitively with the server_name extension; a hello
        without one does not match.
    :param alpn: a protocol (``"h2"``) or a list; matches when the client
        offers any of them.
    :param min_version: ``"TLSv1.2"``, ``"TLSv1.3"`` (see
        :data:`TLS_VERSIONS`) or a number such as ``0x0303``; matches when
        the highest version the client offers is at least this.
    """

    sni: tuple[str, ...] | None = attrs.field(default=None, converter=_names)
    alpn: tuple[str, ...] | None = attrs.field(default=None, converter=_protocols)
    min_version: int | None = attrs.field(default=None, converter=_version)
    name: str = attrs.field(default="tls", kw_only=True)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        verdict, hello = parse_client_hello(data)
        if hello is None:
            return verdict
        return MATCH if self.accepts(hello) else NO_MATCH

    def accepts(self, hello: ClientHello) -> bool:
        """Whether a parsed ClientHello meets this matcher's options."""
        if self.sni is not None:
            if hello.sni is None or not any(fnmatch.fnmatchcase(hello.sni, g) for g in self.sni):
                return False
        if self.alpn is not None and not set(self.alpn).intersection(hello.alpn):
            return False
        return self.min_version is None or hello.max_version >= self.min_version
