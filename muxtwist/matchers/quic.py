"""
QUIC: the client's Initial packets, decrypted, and the TLS ClientHello
carried in their CRYPTO frames (QUIC v1, RFC 9000/9001, and v2, RFC 9369).

Bytes read: each datagram of the flow (see :mod:`muxtwist.matchers.datagram`;
on TCP the buffer is taken as one datagram). Every datagram that carries an
Initial packet must be at least 1200 bytes (RFC 9000, 14.1). The long-header
packets of each datagram are walked by their Length fields (0-RTT packets,
coalesced behind an Initial or alone in a later datagram, are skipped;
trailing padding ends the walk). For each Initial packet the
client's Initial keys are derived from its Destination Connection ID with
HKDF, header protection is removed (AES-ECB mask) and the payload decrypted
(AES-128-GCM), all with ``cryptography``. Frames allowed in a client
Initial are parsed (PADDING, PING, ACK, CRYPTO, CONNECTION_CLOSE; anything
else is NO_MATCH); CRYPTO frames are reassembled by offset, in any order and
across packets and datagrams, and once the ClientHello is whole it goes to
the TLS ClientHello parser of :mod:`muxtwist.matchers.tls`.

NEED_MORE while the ClientHello is incomplete (bounded by the listener's
``max_sniff_datagrams`` and ``sniff_timeout``). NO_MATCH for a first
datagram that is not a client Initial of an accepted version, a packet that
does not decrypt, a change of Destination Connection ID, a ClientHello
declaring more than ``MAX_CLIENT_HELLO`` bytes, a packet of another
version than the flow's first one, a 0-RTT packet to another Destination
Connection ID than the Initials', or a ClientHello the TLS parser
rejects; also for a datagram of more than 8 long-header packets or a flow
of more than 512 frames, which no client's first flight holds (walking them
would let one 64 KiB datagram cost a second of CPU).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from zope.interface import implementer

from muxtwist._options import shown
from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers.datagram import datagrams_of
from muxtwist.matchers.tls import MAX_CLIENT_HELLO, TLS, ClientHello, parse_client_hello

__all__ = ["QUIC", "QUIC_VERSIONS", "initial_keys", "parse_initial_datagrams"]

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

#: Version names accepted by ``versions``.
QUIC_VERSIONS: dict[str, int] = {"v1": 0x00000001, "v2": 0x6B3343CF}
V1, V2 = QUIC_VERSIONS["v1"], QUIC_VERSIONS["v2"]

_SALTS = {
    V1: bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
    V2: bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),
}
_LABELS = {V1: b"quic ", V2: b"quicv2 "}
# Long-header packet types (the two bits after the fixed bit) per version.
_INITIAL = {V1: 0, V2: 1}
_ZERO_RTT = {V1: 1, V2: 2}
_MIN_DATAGRAM = 1200
_MIN_FIRST_DCID = 8
_MAX_CID = 20
# A client's first datagrams coalesce an Initial and perhaps a 0-RTT packet,
# and split its ClientHello over a few CRYPTO frames (some clients mix in
# PING and PADDING frames). Walking more costs CPU per datagram an attacker
# can make as large as 64 KiB, re-done at every evaluation of the flow:
# past these bounds the datagrams are not a client's first flight.
_MAX_PACKETS_PER_DATAGRAM = 8
_MAX_FRAMES = 512


class _Malformed(Exception):
    pass


def _expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """TLS 1.3 HKDF-Expand-Label with an empty context (RFC 8446, 7.1)."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


@functools.lru_cache(maxsize=256)
def initial_keys(version: int, dcid: bytes) -> tuple[bytes, bytes, bytes]:
    """The client's Initial (key, iv, header protection key) for ``version`` and a Destination Connection ID."""
    initial = HKDF.extract(hashes.SHA256(), _SALTS[version], dcid)
    client = _expand_label(initial, b"client in", 32)
    prefix = _LABELS[version]
    return (
        _expand_label(client, prefix + b"key", 16),
        _expand_label(client, prefix + b"iv", 12),
        _expand_label(client, prefix + b"hp", 16),
    )


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """A QUIC variable-length integer at ``pos``: (value, next position)."""
    if pos >= end:
        raise _Malformed()
    first = data[pos]
    size = 1 << (first >> 6)
    if pos + size > end:
        raise _Malformed()
    value = first & 0x3F
    for i in range(1, size):
        value = (value << 8) | data[pos + i]
    return value, pos + size


def _open_initial(datagram: bytes, start: int, pn_offset: int, end: int, version: int, dcid: bytes) -> bytes:
    """Remove header protection from the Initial packet at ``start`` and decrypt its payload."""
    key, iv, hp = initial_keys(version, dcid)
    sample = datagram[pn_offset + 4 : pn_offset + 20]
    if len(sample) < 16 or pn_offset + 20 > end:
        raise _Malformed()
    encryptor = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
    mask = encryptor.update(sample) + encryptor.finalize()
    first = datagram[start] ^ (mask[0] & 0x0F)
    pn_length = (first & 0x03) + 1
    pn = bytes(datagram[pn_offset + i] ^ mask[1 + i] for i in range(pn_length))
    header = bytes([first]) + datagram[start + 1 : pn_offset] + pn
    nonce = bytearray(iv)
    for i, b in enumerate(pn):
        nonce[12 - pn_length + i] ^= b
    try:
        payload = AESGCM(key).decrypt(bytes(nonce), datagram[pn_offset + pn_length : end], header)
    except InvalidTag:
        raise _Malformed() from None
    if first & 0x0C:
        raise _Malformed()  # reserved bits, readable only now, must be zero
    return payload


class _Budget:
    """The frames an evaluation may still read (all packets and datagrams of the flow together)."""

    __slots__ = ("frames",)

    def __init__(self) -> None:
        self.frames = _MAX_FRAMES


def _crypto_frames(payload: bytes, out: list[tuple[int, bytes]], budget: _Budget) -> None:
    """Append the (offset, data) of each CRYPTO frame; raise on anything a client Initial cannot hold."""
    pos, end = 0, len(payload)
    if not end:
        raise _Malformed()
    while pos < end:
        budget.frames -= 1
        if budget.frames < 0:
            raise _Malformed()
        kind, pos = _varint(payload, pos, end)
        if kind == 0x00:  # PADDING: skip the run at once
            rest = payload[pos:end].lstrip(b"\x00")
            pos = end - len(rest)
        elif kind == 0x01:  # PING
            continue
        elif kind in (0x02, 0x03):  # ACK (of a server packet a retransmitting client saw)
            _, pos = _varint(payload, pos, end)
            _, pos = _varint(payload, pos, end)
            ranges, pos = _varint(payload, pos, end)
            _, pos = _varint(payload, pos, end)
            if ranges > end:
                raise _Malformed()
            for _ in range(2 * ranges + (3 if kind == 0x03 else 0)):
                _, pos = _varint(payload, pos, end)
        elif kind == 0x06:  # CRYPTO
            offset, pos = _varint(payload, pos, end)
            length, pos = _varint(payload, pos, end)
            if pos + length > end or offset + length > MAX_CLIENT_HELLO + 4:
                raise _Malformed()
            out.append((offset, payload[pos : pos + length]))
            pos += length
        elif kind == 0x1C:  # CONNECTION_CLOSE
            _, pos = _varint(payload, pos, end)
            _, pos = _varint(payload, pos, end)
            length, pos = _varint(payload, pos, end)
            pos += length
            if pos > end:
                raise _Malformed()
        else:
            raise _Malformed()


def _datagram_crypto(
    datagram: bytes,
    versions: frozenset[int],
    first: bool,
    dcid: bytes | None,
    out: list[tuple[int, bytes]],
    budget: _Budget,
) -> bytes | None:
    """
    Walk the long-header packets of one datagram, decrypting the Initials
    into ``out``; returns the Destination Connection ID they use (``None``
    if the datagram had no Initial).
    """
    pos, size = 0, len(datagram)
    seen_initial = False
    packets = 0
    while pos < size:
        packets += 1
        if packets > _MAX_PACKETS_PER_DATAGRAM:
            raise _Malformed()
        start = pos
        head = datagram[pos]
        if head & 0xC0 != 0xC0:  # not a long header with the fixed bit: padding, or a later short packet
            if start == 0:
                raise _Malformed()
            break
        if pos + 6 > size:
            raise _Malformed()
        version = int.from_bytes(datagram[pos + 1 : pos + 5], "big")
        if version not in versions:
            raise _Malformed()
        versions = frozenset({version})  # a client's first packets share one version
        dcid_length = datagram[pos + 5]
        pos += 6
        if dcid_length > _MAX_CID or pos + dcid_length >= size:
            raise _Malformed()
        packet_dcid = datagram[pos : pos + dcid_length]
        pos += dcid_length
        scid_length = datagram[pos]
        pos += 1 + scid_length
        if scid_length > _MAX_CID or pos > size:
            raise _Malformed()
        kind = (head >> 4) & 0x03
        if kind == _INITIAL[version]:
            token_length, pos = _varint(datagram, pos, size)
            pos += token_length
        elif kind != _ZERO_RTT[version] or (first and start == 0):
            # A client's first packets are Initials, and 0-RTT ones after the
            # first: coalesced behind an Initial, or a datagram of their own.
            raise _Malformed()
        length, pos = _varint(datagram, pos, size)
        end = pos + length
        if end > size or length < 20:
            raise _Malformed()
        if kind == _INITIAL[version]:
            if first and start == 0 and dcid_length < _MIN_FIRST_DCID:
                raise _Malformed()
            if dcid is None:
                dcid = packet_dcid
            elif packet_dcid != dcid:
                raise _Malformed()
            _crypto_frames(_open_initial(datagram, start, pos, end, version, packet_dcid), out, budget)
            seen_initial = True
        elif packet_dcid != dcid:
            raise _Malformed()  # 0-RTT goes to the connection ID of the client's Initial (RFC 9000 7.2)
        pos = end
    if seen_initial and size < _MIN_DATAGRAM:
        raise _Malformed()
    return dcid if seen_initial else None


def _reassemble(frames: list[tuple[int, bytes]]) -> bytes:
    """The contiguous CRYPTO stream from offset 0 (overlaps allowed, as retransmissions carry them)."""
    stream = bytearray()
    for offset, data in sorted(frames, key=lambda f: f[0]):
        if offset > len(stream):
            break
        stream += data[len(stream) - offset :]
    return bytes(stream)


def parse_initial_datagrams(
    datagrams: Iterable[bytes], versions: Iterable[int] = (V1, V2)
) -> tuple[Verdict, ClientHello | None]:
    """
    The ClientHello carried by a QUIC client's first datagrams.

    (MATCH, hello) once it is whole and well formed; (NEED_MORE, None) while
    CRYPTO data is missing; (NO_MATCH, None) for anything else. Never raises.
    """
    accepted = frozenset(versions)
    frames: list[tuple[int, bytes]] = []
    dcid: bytes | None = None
    budget = _Budget()
    try:
        for i, datagram in enumerate(datagrams):
            found = _datagram_crypto(datagram, accepted, i == 0, dcid, frames, budget)
            if i == 0 and found is None:
                return NO_MATCH, None
            if i == 0:
                # Later datagrams are the same client's: the version of its first packet.
                accepted = frozenset({int.from_bytes(datagram[1:5], "big")})
            dcid = found or dcid
    except _Malformed:
        return NO_MATCH, None
    stream = _reassemble(frames)
    if stream[:1] not in (b"", b"\x01"):
        return NO_MATCH, None
    if len(stream) < 4:
        return NEED_MORE, None
    need = int.from_bytes(stream[1:4], "big")
    if need > MAX_CLIENT_HELLO:
        return NO_MATCH, None
    if len(stream) < 4 + need:
        return NEED_MORE, None
    message = stream[: 4 + need]
    records = b"".join(
        b"\x16\x03\x03" + len(chunk).to_bytes(2, "big") + chunk
        for chunk in (message[i : i + 16384] for i in range(0, len(message), 16384))
    )
    verdict, hello = parse_client_hello(records)
    return (MATCH, hello) if hello is not None else (NO_MATCH, None)


def _versions(value: Iterable[str | int]) -> frozenset[int]:
    out = set()
    for v in (value,) if isinstance(value, str | int) else value:
        if isinstance(v, int) and v in _SALTS:
            out.add(v)
        elif isinstance(v, str) and v in QUIC_VERSIONS:
            out.add(QUIC_VERSIONS[v])
        else:
            raise ValueError(f"unknown QUIC version {shown(v)}; use {', '.join(QUIC_VERSIONS)}")
    if not out:
        raise ValueError("QUIC versions must name at least one version")
    return frozenset(out)


@implementer(IMatcher)
@attrs.frozen
class QUIC:
    """
    A QUIC client's Initial packets, by the SNI and ALPN of the ClientHello
    inside them.

    :param sni: a host name or glob, or a list of them (as :class:`TLS`).
    :param alpn: a protocol (``"h3"``) or a list; matches when the client
        offers any of them.
    :param versions: ``"v1"``, ``"v2"`` or both (the default).
    """

    sni: str | tuple[str, ...] | None = None
    alpn: str | tuple[str, ...] | None = None
    versions: frozenset[int] = attrs.field(default=("v1", "v2"), converter=_versions)
    name: str = attrs.field(default="quic", kw_only=True)
    _tls: TLS = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_tls", TLS(sni=self.sni, alpn=self.alpn))

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        verdict, hello = parse_initial_datagrams(datagrams_of(data, info), self.versions)
        if hello is None:
            return verdict
        return MATCH if self._tls.accepts(hello) else NO_MATCH
