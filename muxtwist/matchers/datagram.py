"""
How a UDP flow is shown to matchers.

A matcher's ``match(data, info)`` contract is kept on UDP: ``data`` is the
concatenation of the flow's datagrams held so far, and ``info`` is a
:class:`DatagramInfo` whose ``datagrams`` keeps the boundaries, for the
matchers that need them (QUIC packets may be followed by padding inside a
datagram; DNS, WireGuard, STUN and DTLS read the first datagram only).
Stream matchers such as ``Prefix`` or ``Regex`` work unchanged on the
concatenation. :func:`datagrams_of` gives a matcher the datagrams whichever
transport it runs on: on TCP (a plain :class:`ConnectionInfo`) the buffer is
taken as one datagram.
"""

from __future__ import annotations

import attrs

from muxtwist.interfaces import ConnectionInfo

__all__ = ["DatagramInfo", "datagrams_of", "is_datagram"]


@attrs.frozen
class DatagramInfo(ConnectionInfo):
    """
    A :class:`ConnectionInfo` for a UDP flow (one remote address and port).

    :ivar datagrams: the flow's datagrams held so far, in arrival order;
        ``data`` given to the matcher is their concatenation.
    """

    datagrams: tuple[bytes, ...] = ()


def is_datagram(info: ConnectionInfo) -> bool:
    """Whether ``info`` describes a UDP flow."""
    return isinstance(info, DatagramInfo)


def datagrams_of(data: bytes, info: ConnectionInfo) -> tuple[bytes, ...]:
    """The datagrams behind ``data``: ``info.datagrams`` on UDP, else ``(data,)``."""
    if isinstance(info, DatagramInfo) and info.datagrams:
        return info.datagrams
    return (data,) if data else ()
