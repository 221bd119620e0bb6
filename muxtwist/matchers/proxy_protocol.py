"""
The PROXY protocol (versions 1 and 2), as pure functions over bytes: parse a
header, tell whether bytes can begin one, build one, and match it.

Nothing here knows about Twisted: :mod:`muxtwist.proxyprotocol` turns the
parsed addresses into Twisted addresses and reads headers off connections.
"""

from __future__ import annotations

import enum
import ipaddress
import struct

import attrs
from zope.interface import implementer

from muxtwist._rules import needs_bytes
from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers import _options

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_PAYLOAD",
    "V1_PREFIX",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocol",
    "ProxyProtocolError",
    "Signature",
    "build_v1",
    "build_v2",
    "parse",
    "signature",
]

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The longest v1 header the specification allows, CRLF included.
MAX_V1_LENGTH = 107
#: The most bytes of v2 addresses and TLVs accepted after the 16-byte fixed
#: part. The specification allows 65535; real senders use a few hundred, and
#: this is what a connection may make us hold before its header is complete.
MAX_V2_PAYLOAD = 4096

_V2_FIXED = 16
_INET_LENGTH = 12
_INET6_LENGTH = 36
_UNIX_LENGTH = 216
#: v2 address family byte -> (address class, address width, address block
#: length, the header's protocol name, the family's name in errors).
_INET_FAMILIES: dict[int, tuple[type[ipaddress.IPv4Address | ipaddress.IPv6Address], int, int, str, str]] = {
    1: (ipaddress.IPv4Address, 4, _INET_LENGTH, "TCP4", "IPv4"),
    2: (ipaddress.IPv6Address, 16, _INET6_LENGTH, "TCP6", "IPv6"),
}


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header; the reason says why."""


class Signature(enum.Enum):
    """Whether bytes can begin a PROXY header."""

    YES = "yes"
    NO = "no"
    MAYBE = "maybe"


Address = tuple[str, int] | str


@attrs.frozen
class ProxyHeader:
    """
    One parsed PROXY header.

    :ivar version: 1 or 2.
    :ivar local: the v2 LOCAL command (a health check from the proxy itself):
        the connection's own addresses stand.
    :ivar family: ``"TCP4"``, ``"TCP6"``, ``"UNIX"`` or ``"UNKNOWN"`` (v1
        UNKNOWN, v2 AF_UNSPEC, or LOCAL): only the first three carry addresses.
    :ivar source: ``(ip, port)`` for TCP4/TCP6, a path for UNIX, else ``None``.
    :ivar destination: likewise.
    :ivar length: how many bytes the header took.
    :ivar tlvs: the v2 type-length-value extensions, in order.
    """

    version: int
    local: bool
    family: str
    source: Address | None
    destination: Address | None
    length: int
    tlvs: tuple[tuple[int, bytes], ...] = ()


def signature(data: bytes) -> Signature:
    """Whether ``data`` begins with a PROXY signature, could still, or cannot."""
    for sig in (V1_PREFIX, V2_SIGNATURE):
        if data.startswith(sig):
            return Signature.YES
    n = len(data)
    if V1_PREFIX[:n] == data or V2_SIGNATURE[:n] == data:
        return Signature.MAYBE
    return Signature.NO


def parse(data: bytes) -> ProxyHeader | None:
    """
    Parse the PROXY header at the start of ``data``.

    :returns: the header, or ``None`` while ``data`` is a valid but
        incomplete beginning of one.
    :raises ProxyProtocolError: ``data`` does not begin with a valid header.
    """
    sig = signature(data)
    if sig is Signature.MAYBE:
        return None
    if sig is Signature.NO:
        raise ProxyProtocolError("no PROXY protocol signature")
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    return _parse_v2(data)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, MAX_V1_LENGTH)
    if end < 0:
        if len(data) >= MAX_V1_LENGTH:
            raise ProxyProtocolError(f"v1 header longer than {MAX_V1_LENGTH} bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyProtocolError("v1 header not ended by CRLF")
        return None
    line = data[len(V1_PREFIX) : end]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("v1 header is not ASCII") from None
    parts = text.split(" ")
    length = end + 2
    if parts[0] == "UNKNOWN":
        # The rest of an UNKNOWN line is to be ignored, whatever it holds.
        return ProxyHeader(1, False, "UNKNOWN", None, None, length)
    if len(parts) != 5:
        raise ProxyProtocolError(f"v1 header needs 5 fields, got {len(parts)}")
    family, src, dst, sport, dport = parts
    if family not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"v1 header has unknown protocol {family!r}")
    version = 4 if family == "TCP4" else 6
    return ProxyHeader(
        1,
        False,
        family,
        (_v1_ip(src, version), _v1_port(sport)),
        (_v1_ip(dst, version), _v1_port(dport)),
        length,
    )


def _v1_ip(text: str, version: int) -> str:
    if "%" in text:
        # ipaddress takes a scope (fe80::1%eth0); the header's grammar has none.
        raise ProxyProtocolError(f"v1 header address {text!r} has a scope, which the protocol does not allow")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"v1 header has a bad address {text!r}") from None
    if ip.version != version:
        raise ProxyProtocolError(f"v1 header address {text!r} is not IPv{version}")
    return str(ip)


def _v1_port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or len(text) > 5 or (len(text) > 1 and text[0] == "0"):
        raise ProxyProtocolError(f"v1 header has a bad port {text!r}")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError(f"v1 header port {port} out of range")
    return port


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < _V2_FIXED:
        return None
    ver_cmd, fam, size = struct.unpack_from("!BBH", data, 12)
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"v2 header has version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command > 1:
        raise ProxyProtocolError(f"v2 header has unknown command {command}")
    if size > MAX_V2_PAYLOAD:
        raise ProxyProtocolError(f"v2 header declares {size} bytes, more than the {MAX_V2_PAYLOAD} accepted")
    length = _V2_FIXED + size
    if len(data) < length:
        return None
    payload = data[_V2_FIXED:length]
    family, transport = fam >> 4, fam & 0x0F
    if family > 3 or transport > 2:
        raise ProxyProtocolError(f"v2 header has unknown address family byte 0x{fam:02x}")
    if command == 0:
        return ProxyHeader(2, True, "UNKNOWN", None, None, length, _tlvs(payload, 0, strict=False))
    if family == 0:
        return ProxyHeader(2, False, "UNKNOWN", None, None, length, _tlvs(payload, 0, strict=False))
    if transport != 1:
        raise ProxyProtocolError("v2 header is not for a stream connection")
    inet = _INET_FAMILIES.get(family)
    if inet is not None:
        address, width, needed, protocol, words = inet
        if size < needed:
            raise ProxyProtocolError(f"v2 header too short for {words} addresses")
        s, d = str(address(payload[0:width])), str(address(payload[width : 2 * width]))
        sport, dport = struct.unpack_from("!HH", payload, 2 * width)
        return ProxyHeader(2, False, protocol, (s, sport), (d, dport), length, _tlvs(payload, needed))
    if size < _UNIX_LENGTH:
        raise ProxyProtocolError("v2 header too short for UNIX addresses")
    return ProxyHeader(
        2,
        False,
        "UNIX",
        _unix_path(payload[0:108]),
        _unix_path(payload[108:216]),
        length,
        _tlvs(payload, _UNIX_LENGTH),
    )


def _unix_path(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _tlvs(payload: bytes, start: int, *, strict: bool = True) -> tuple[tuple[int, bytes], ...]:
    found = []
    i, end = start, len(payload)
    while i < end:
        if end - i < 3:
            if strict:
                raise ProxyProtocolError("v2 header has a truncated TLV")
            break
        kind, size = struct.unpack_from("!BH", payload, i)
        if i + 3 + size > end:
            if strict:
                raise ProxyProtocolError("v2 header has a TLV longer than the header")
            break
        found.append((kind, payload[i + 3 : i + 3 + size]))
        i += 3 + size
    return tuple(found)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text.split("%", 1)[0])


def _family(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> str:
    """TCP4 when both are IPv4 (v4-mapped counts), TCP6 when both are IP, else UNKNOWN."""
    if source is None or destination is None:
        return "UNKNOWN"
    ips = (_ip(source[0]), _ip(destination[0]))
    if all(ip.version == 4 or ip.ipv4_mapped is not None for ip in ips):
        return "TCP4"
    return "TCP6"


def _as_family(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, family: str) -> str:
    if family == "TCP4":
        if isinstance(ip, ipaddress.IPv6Address):
            mapped = ip.ipv4_mapped
            assert mapped is not None
            return str(mapped)
        return str(ip)
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ipaddress.IPv6Address(f"::ffff:{ip}"))
    return str(ip)


def build_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """
    A v1 header for a TCP connection from ``source`` to ``destination``
    (``(ip, port)`` each). IPv4 and v4-mapped IPv6 on both ends make a TCP4
    line; a mix of IPv4 and IPv6 makes TCP6 with the IPv4 side v4-mapped;
    ``None`` on either end makes ``PROXY UNKNOWN``.
    """
    family = _family(source, destination)
    if family == "UNKNOWN" or source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    s, d = _as_family(_ip(source[0]), family), _as_family(_ip(destination[0]), family)
    return f"PROXY {family} {s} {d} {source[1]} {destination[1]}\r\n".encode("ascii")


def build_v2(source: tuple[str, int] | None, destination: tuple[str, int] | None, *, local: bool = False) -> bytes:
    """
    A v2 header, with the same address rules as :func:`build_v1`. ``None`` on
    either end makes a PROXY command with no addresses (AF_UNSPEC);
    ``local=True`` makes the LOCAL command.
    """
    family = "UNKNOWN" if local else _family(source, destination)
    command = 0x20 if local else 0x21
    if family == "UNKNOWN" or source is None or destination is None:
        return V2_SIGNATURE + struct.pack("!BBH", command, 0x00, 0)
    s, d = _ip(_as_family(_ip(source[0]), family)), _ip(_as_family(_ip(destination[0]), family))
    body = s.packed + d.packed + struct.pack("!HH", source[1], destination[1])
    family_byte = 0x11 if family == "TCP4" else 0x21
    return V2_SIGNATURE + struct.pack("!BBH", command, family_byte, len(body)) + body


def _version(instance: object, attribute: object, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or value not in (1, 2)):
        raise ValueError(f"ProxyProtocol version must be 1, 2 or None (either), got {_options.describe(value)}")


@needs_bytes
@implementer(IMatcher)
@attrs.frozen
class ProxyProtocol:
    """
    A connection that starts with a complete, valid PROXY header (v1 or v2):
    NEED_MORE while the header is incomplete, NO_MATCH for anything else.

    To *accept* PROXY headers from trusted peers, use the listener option
    ``accept_proxy_protocol`` instead; this matcher only routes such
    connections, header and all, for example to a backend that reads it.
    """

    version: int | None = attrs.field(default=None, validator=_version)
    name: str = attrs.field(default="proxy_protocol", kw_only=True, validator=_options.check_name)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        if self.version is not None and data:
            # The first byte tells the versions apart: no need to wait for the other one's header.
            if data[0] != (V1_PREFIX if self.version == 1 else V2_SIGNATURE)[0]:
                return Verdict.NO_MATCH
        try:
            header = parse(data)
        except ProxyProtocolError:
            return Verdict.NO_MATCH
        if header is None:
            return Verdict.NEED_MORE
        if self.version is not None and header.version != self.version:
            return Verdict.NO_MATCH
        return Verdict.MATCH
