"""
DTLS: a client's first flight, a ClientHello in DTLS 1.0/1.2 records
(RFC 6347; DTLS 1.3 clients send the same first record, RFC 9147).

Bytes read: every record of the flow's datagrams (on TCP, the buffer as one
datagram). Records must be handshake records (type 22) of version 0xfeff or
0xfefd, epoch 0, at most 2^14 bytes; each carries a handshake fragment of
the ClientHello (type 1, message_seq 0) with its offset and length, and the
fragments are reassembled by offset, in any order and across datagrams. The
whole body, with its DTLS cookie taken out and its version written as TLS
1.2's, goes to the TLS ClientHello parser of :mod:`muxtwist.matchers.tls`
(so ``legacy_version`` reads 0x0303). NEED_MORE while fragments are
missing; NO_MATCH for anything else.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
from zope.interface import implementer

from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers.datagram import datagrams_of, is_datagram
from muxtwist.matchers.tls import MAX_CLIENT_HELLO, TLS, ClientHello, parse_client_hello

__all__ = ["DTLS", "parse_dtls_client_hello"]

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

_VERSIONS = (b"\xfe\xff", b"\xfe\xfd")
_RECORD_HEADER = 13
_HANDSHAKE_HEADER = 12
_MAX_RECORD = 1 << 14
_MAX_FRAGMENTS = 64


class _Malformed(Exception):
    pass


def _fragments(datagram: bytes, out: list[tuple[int, int, bytes]], whole: bool) -> bool:
    """Append (total length, offset, data) of each ClientHello fragment; False if a record is cut short."""
    pos, size = 0, len(datagram)
    while pos < size:
        header = datagram[pos : pos + _RECORD_HEADER]
        if header[:1] != b"\x16"[: len(header)] or (len(header) >= 3 and header[1:3] not in _VERSIONS):
            raise _Malformed()
        if len(header) >= 5 and header[3:5] != b"\x00\x00":
            raise _Malformed()  # epoch 0: nothing is encrypted yet
        if len(header) < _RECORD_HEADER:
            if whole:
                raise _Malformed()
            return False
        length = int.from_bytes(header[11:13], "big")
        if length < _HANDSHAKE_HEADER or length > _MAX_RECORD:
            raise _Malformed()
        end = pos + _RECORD_HEADER + length
        if end > size:
            if whole:
                raise _Malformed()
            return False
        fragment = datagram[pos + _RECORD_HEADER : end]
        total = int.from_bytes(fragment[1:4], "big")
        offset = int.from_bytes(fragment[6:9], "big")
        frag_length = int.from_bytes(fragment[9:12], "big")
        if fragment[0] != 1 or fragment[4:6] != b"\x00\x00" or frag_length != length - _HANDSHAKE_HEADER:
            raise _Malformed()
        if total > MAX_CLIENT_HELLO or offset + frag_length > total or len(out) >= _MAX_FRAGMENTS:
            raise _Malformed()
        if out and out[0][0] != total:
            raise _Malformed()
        out.append((total, offset, fragment[_HANDSHAKE_HEADER:]))
        pos = end
    return True


def _as_tls_record(body: bytes) -> bytes:
    """The DTLS ClientHello body as a TLS record: version 0x0303, the cookie taken out."""
    if len(body) < 35:
        raise _Malformed()
    session_end = 35 + body[34]
    if session_end >= len(body):
        raise _Malformed()
    cookie_end = session_end + 1 + body[session_end]
    if cookie_end > len(body):
        raise _Malformed()
    tls_body = b"\x03\x03" + body[2:session_end] + body[cookie_end:]
    message = b"\x01" + len(tls_body).to_bytes(3, "big") + tls_body
    return b"".join(
        b"\x16\x03\x03" + len(chunk).to_bytes(2, "big") + chunk
        for chunk in (message[i : i + _MAX_RECORD] for i in range(0, len(message), _MAX_RECORD))
    )


def parse_dtls_client_hello(datagrams: Iterable[bytes], whole: bool = True) -> tuple[Verdict, ClientHello | None]:
    """
    The ClientHello in DTLS records spread over ``datagrams``: (MATCH,
    hello), (NEED_MORE, None) while fragments (or, unless ``whole``, bytes of
    a record) are missing, else (NO_MATCH, None). Never raises.
    """
    found: list[tuple[int, int, bytes]] = []
    try:
        for datagram in datagrams:
            if not _fragments(datagram, found, whole):
                return NEED_MORE, None
        if not found:
            return NEED_MORE, None
        total = found[0][0]
        body = bytearray()
        for _, offset, data in sorted(found, key=lambda f: f[1]):
            if offset > len(body):
                return NEED_MORE, None
            body += data[len(body) - offset :]
        if len(body) < total:
            return NEED_MORE, None
        verdict, hello = parse_client_hello(_as_tls_record(bytes(body[:total])))
    except _Malformed:
        return NO_MATCH, None
    return (MATCH, hello) if hello is not None else (NO_MATCH, None)


@implementer(IMatcher)
@attrs.frozen
class DTLS:
    """
    A DTLS ClientHello, by SNI and ALPN like :class:`TLS`.

    :param sni: a host name or glob, or a list of them.
    :param alpn: a protocol or a list; matches when the client offers any.
    """

    sni: str | tuple[str, ...] | None = None
    alpn: str | tuple[str, ...] | None = None
    name: str = attrs.field(default="dtls", kw_only=True)
    _tls: TLS = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_tls", TLS(sni=self.sni, alpn=self.alpn))

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        verdict, hello = parse_dtls_client_hello(datagrams_of(data, info), whole=is_datagram(info))
        if hello is None:
            return verdict
        return MATCH if self._tls.accepts(hello) else NO_MATCH
