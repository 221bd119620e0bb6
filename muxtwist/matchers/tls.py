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

from muxtwist._options import shown
from muxtwist._rules import needs_bytes
from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers import _options

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


def _u16(data: bytes, pos: int) -> int:
    return (data[pos] << 8) | data[pos + 1]


def _vector(data: bytes, pos: int, end: int, length_bytes: int) -> tuple[int, int]:
    """The bounds ``(start, stop)`` of the length-prefixed vector at ``pos``; malformed if it overruns ``end``."""
    start = pos + length_bytes
    if start > end:
        raise _Malformed()
    n = data[pos] if length_bytes == 1 else _u16(data, pos)
    stop = start + n
    if stop > end:
        raise _Malformed()
    return start, stop


def _whole_vector(data: bytes, pos: int, end: int, length_bytes: int) -> tuple[int, int]:
    """A non-empty vector that fills the extension exactly."""
    start, stop = _vector(data, pos, end, length_bytes)
    if stop != end or start == stop:
        raise _Malformed()
    return start, stop


def _server_name(data: bytes, pos: int, end: int) -> str | None:
    pos, end = _whole_vector(data, pos, end, 2)
    found: str | None = None
    while pos < end:
        kind = data[pos]
        start, stop = _vector(data, pos + 1, end, 2)
        if kind == 0 and found is None:
            if start == stop:
                raise _Malformed()
            try:
                found = data[start:stop].decode("ascii").rstrip(".").lower()
            except UnicodeDecodeError:
                raise _Malformed() from None
        pos = stop
    return found


def _alpn(data: bytes, pos: int, end: int) -> tuple[str, ...]:
    pos, end = _whole_vector(data, pos, end, 2)
    out = []
    while pos < end:
        start, stop = _vector(data, pos, end, 1)
        if start == stop:
            raise _Malformed()
        out.append(data[start:stop].decode("latin-1"))
        pos = stop
    return tuple(out)


def _supported_versions(data: bytes, pos: int, end: int) -> tuple[int, ...]:
    start, stop = _whole_vector(data, pos, end, 1)
    if (stop - start) % 2:
        raise _Malformed()
    return tuple(v for v in _uint16s(data[start:stop]) if not _is_grease(v))


def _parse_body(body: bytes) -> ClientHello:
    # Positions into the body instead of slices and reader objects: this
    # runs for every TLS connection a rule list looks at.
    end = len(body)
    if end < 35:
        raise _Malformed()
    legacy_version = _u16(body, 0)
    if legacy_version >> 8 != 3 or legacy_version & 0xFF > 4:
        raise _Malformed()
    start, pos = _vector(body, 34, end, 1)  # session id, after the 32 random bytes
    if pos - start > 32:
        raise _Malformed()
    start, pos = _vector(body, pos, end, 2)
    if start == pos or (pos - start) % 2:
        raise _Malformed()
    cipher_suites = tuple(s for s in _uint16s(body[start:pos]) if s & 0x0F0F != 0x0A0A)
    start, pos = _vector(body, pos, end, 1)  # compression methods
    if start == pos:
        raise _Malformed()
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] | None = None
    types: list[int] = []
    if pos < end:
        pos, stop = _vector(body, pos, end, 2)
        if stop != end:
            raise _Malformed()
        seen: set[int] = set()
        while pos < end:
            if pos + 2 > end:
                raise _Malformed()
            kind = _u16(body, pos)
            start, pos = _vector(body, pos + 2, end, 2)
            if kind in seen:
                raise _Malformed()
            seen.add(kind)
            types.append(kind)
            if kind == _EXT_SERVER_NAME:
                sni = _server_name(body, start, pos)
            elif kind == _EXT_ALPN:
                alpn = _alpn(body, start, pos)
            elif kind == _EXT_SUPPORTED_VERSIONS:
                versions = _supported_versions(body, start, pos)
    return ClientHello(
        legacy_version=legacy_version,
        versions=versions if versions else (legacy_version,),
        sni=sni,
        alpn=alpn,
        cipher_suites=cipher_suites,
        extensions=tuple(types),
        size=end,
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


_sni_globs = _options.strings("TLS", "sni", _options.host_glob)
_alpn_names = _options.strings("TLS", "alpn")


def _protocols(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    return _alpn_names(value)


def _names(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    values = _sni_globs(value)
    return None if values is None else tuple(v.lower().rstrip(".") for v in values)


def _version(value: str | int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0x0300 <= value <= 0x0304:
            # In hex as the versions are written, unless too long to show.
            got = f"{value:#06x}" if value.bit_length() <= 64 else shown(value)
            raise ValueError(f"TLS min_version must be 0x0300 (SSLv3) to 0x0304 (TLSv1.3), got {got}")
        return value
    if not isinstance(value, str):
        raise TypeError(f"TLS min_version must be a version name or number, got {_options.describe(value)}")
    try:
        return TLS_VERSIONS[value]
    except KeyError:
        raise ValueError(
            f"TLS min_version must be one of {', '.join(TLS_VERSIONS)} (or a number), got {shown(value)}"
        ) from None


@needs_bytes
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
    name: str = attrs.field(default="tls", kw_only=True, validator=_options.check_name)

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
