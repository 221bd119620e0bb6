"""
Hand-built QUIC client Initial packets (RFC 9000 17.2.2, RFC 9001 5, RFC
9369), for tests: CRYPTO frames placed as a test wants, encrypted and
header-protected with the Initial keys.
"""

from __future__ import annotations

import itertools
import ssl
from collections.abc import Sequence

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from muxtwist.matchers.quic import V1, initial_keys


def varint(value: int) -> bytes:
    if value < 0x40:
        return bytes([value])
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 0x40000000:
        return (value | 0x80000000).to_bytes(4, "big")
    return (value | 0xC000000000000000).to_bytes(8, "big")


def crypto_frame(offset: int, data: bytes) -> bytes:
    return b"\x06" + varint(offset) + varint(len(data)) + data


def initial_packet(
    frames: bytes, *, dcid: bytes, scid: bytes = b"\x01\x02\x03\x04", pn: int = 0, version: int = V1, pad_to: int = 0
) -> bytes:
    """One protected Initial packet; PADDING frames make the packet ``pad_to`` bytes long."""
    initial_type = 0 if version == V1 else 1
    pn_bytes = pn.to_bytes(2, "big")
    first = 0xC0 | (initial_type << 4) | (len(pn_bytes) - 1)

    def header(payload_length: int) -> bytes:
        length = len(pn_bytes) + payload_length + 16  # the AEAD tag
        return (
            bytes([first, *version.to_bytes(4, "big"), len(dcid)])
            + dcid
            + bytes([len(scid)])
            + scid
            + varint(0)  # no token
            + (0x4000 | length).to_bytes(2, "big")
        )

    plain = frames
    if pad_to:
        plain += b"\x00" * max(0, pad_to - len(header(len(plain))) - len(pn_bytes) - len(plain) - 16)
    key, iv, hp = initial_keys(version, dcid)
    head = header(len(plain)) + pn_bytes
    nonce = bytearray(iv)
    for i, b in enumerate(pn.to_bytes(8, "big")):
        nonce[4 + i] ^= b
    sealed = AESGCM(key).encrypt(bytes(nonce), plain, head)
    pn_offset = len(head) - len(pn_bytes)
    sample = (pn_bytes + sealed)[4:20]
    encryptor = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
    mask = encryptor.update(sample) + encryptor.finalize()
    protected = bytearray(head + sealed)
    protected[0] ^= mask[0] & 0x0F
    for i in range(len(pn_bytes)):
        protected[pn_offset + i] ^= mask[1 + i]
    return bytes(protected)


def initial_datagrams(
    hello: bytes, cuts: Sequence[int], *, dcid: bytes = b"\x83\x94\xc8\xf0\x3e\x51\x57\x08", version: int = V1
) -> list[bytes]:
    """
    The handshake message ``hello`` cut at ``cuts`` into CRYPTO frames, one
    Initial packet per piece, each padded to a 1200-byte datagram, in order.
    """
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(hello))), len(hello)]
    return [
        initial_packet(crypto_frame(a, hello[a:b]), dcid=dcid, pn=i, version=version, pad_to=1200)
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]


def tls_client_hello(server_name: str, alpn: Sequence[str]) -> bytes:
    """A real ClientHello handshake message (Python's ssl), for CRYPTO frames."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    record = outgoing.read()
    assert record[0] == 22
    return record[5:]
