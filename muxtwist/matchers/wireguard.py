"""
WireGuard: the handshake initiation that opens every session (the
WireGuard paper, section 5.4.2).

Bytes read: the first datagram (on TCP, the buffer). It must be exactly 148
bytes: message type 1, three reserved zero bytes, the sender index, the
unencrypted ephemeral key (32), the encrypted static key (48), the encrypted
timestamp (28), ``mac1`` (16) and ``mac2`` (16). Given the server's public
key, ``mac1`` is checked too (keyed BLAKE2s over the first 116 bytes, with
the key BLAKE2s("mac1----" || public key)), which tells one WireGuard server
from another. NEED_MORE only on TCP before 148 bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import attrs
from zope.interface import implementer

from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers.datagram import datagrams_of, is_datagram

__all__ = ["INITIATION_SIZE", "WireGuard", "mac1"]

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

INITIATION_SIZE = 148
_HEAD = b"\x01\x00\x00\x00"


def mac1(message: bytes, public_key: bytes) -> bytes:
    """The ``mac1`` a client computes over ``message[:116]`` for a server's 32-byte public key."""
    key = hashlib.blake2s(b"mac1----" + public_key).digest()
    return hashlib.blake2s(message[:116], key=key, digest_size=16).digest()


def _public_key(value: str | bytes | None) -> bytes | None:
    if value is None:
        return None
    raw = base64.b64decode(value, validate=True) if isinstance(value, str) else bytes(value)
    if len(raw) != 32:
        raise ValueError(f"a WireGuard public key is 32 bytes (44 characters of base64), got {len(raw)} bytes")
    return raw


@implementer(IMatcher)
@attrs.frozen
class WireGuard:
    """
    A WireGuard handshake initiation.

    :param public_key: the server's public key (base64, as ``wg`` prints
        it, or 32 bytes); when given, only initiations meant for that server
        (a valid ``mac1``) match.
    """

    public_key: bytes | None = attrs.field(default=None, converter=_public_key, repr=False)
    name: str = attrs.field(default="wireguard", kw_only=True)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        grams = datagrams_of(data, info)
        first = grams[0] if grams else b""
        if first[:4] != _HEAD[: len(first)]:
            return NO_MATCH
        if len(first) < INITIATION_SIZE and not is_datagram(info):
            return NEED_MORE
        if len(first) != INITIATION_SIZE:
            return NO_MATCH
        if self.public_key is not None and not hmac.compare_digest(first[116:132], mac1(first, self.public_key)):
            return NO_MATCH
        return MATCH
