"""
The PROXY protocol on Twisted connections: write a header for a connection's
addresses, and read one off an incoming connection before it is sniffed.

The rules :class:`ProxyHeaderReader` applies (a listener's
``accept_proxy_protocol=[CIDRs]``):

- a peer in the trusted networks must start with a v1 or v2 header; the
  header's source and destination become ``info.proxy_source`` and
  ``info.proxy_destination``. A v2 LOCAL header, a v2 header without
  addresses and a v1 ``UNKNOWN`` header are accepted and keep the real peer;
- a peer outside them that sends a header is refused (it could otherwise
  claim any source address);
- a peer outside them that sends no header is sniffed as usual: its bytes
  come back unchanged as soon as they cannot be a PROXY signature, and if it
  stops (end of stream, the sniff timeout) while they still could, the bytes
  held so far are sniffed as usual too (:meth:`ProxyHeaderReader.finish`);
- a trusted peer whose header is missing, malformed or cut short (by its end
  of stream or the sniff timeout) is refused; it is never taken for a client.

``accept_proxy_protocol`` entries are CIDRs, or ``"unix"``: every peer of a
UNIX-socket listener is trusted (a balancer on the same host, as HAProxy's
``server ... /run/mux.sock send-proxy-v2``), since only what can open the
socket file can connect.

The pure parsing lives in :mod:`muxtwist.matchers.proxy_protocol`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

import attrs
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress

from muxtwist._limits import address_text
from muxtwist._options import shown
from muxtwist.interfaces import ConnectionInfo
from muxtwist.matchers._basic import in_networks, parse_networks
from muxtwist.matchers.proxy_protocol import (
    Address,
    ProxyHeader,
    Signature,
    build_v1,
    build_v2,
    parse,
    signature,
)

__all__ = ["ProxyHeaderReader", "Trust", "header_for", "ip_port"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The ``accept_proxy_protocol`` entry that trusts every peer of a UNIX-socket listener.
UNIX = "unix"


@attrs.frozen
class Trust:
    """
    Which peers may (and must) send a PROXY header: those in ``networks``,
    and, with ``unix``, every peer of a UNIX-socket listener.
    """

    networks: tuple[_Network, ...] = ()
    unix: bool = False

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Trust:
        """Read ``accept_proxy_protocol``: CIDRs (a bare address is one host) and ``"unix"``."""
        entries = list(entries)
        for entry in entries:
            if not isinstance(entry, str):
                raise ValueError(f"not an IP network or {UNIX!r}: {shown(entry)}")
        cidrs = [e for e in entries if e.strip().lower() != UNIX]
        return cls(parse_networks(cidrs), len(cidrs) < len(entries))

    def trusts(self, peer: IAddress | None) -> bool:
        """Whether ``peer`` (the transport's own peer) is trusted."""
        if isinstance(peer, UNIXAddress):
            return self.unix
        return in_networks(_peer_ip(peer), self.networks)


def ip_port(address: IAddress | None) -> tuple[str, int] | None:
    """``(ip, port)`` of a TCP address (IPv6 scope removed), ``None`` for anything else."""
    if not isinstance(address, IPv4Address | IPv6Address):
        return None
    host = address.host.split("%", 1)[0]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return host, address.port


def header_for(version: int, source: IAddress | None, destination: IAddress | None) -> bytes:
    """
    The PROXY header (``version`` 1 or 2) telling a backend that a connection
    came from ``source`` to ``destination``. Non-IP addresses (UNIX sockets)
    make an UNKNOWN (v1) or address-less (v2) header, as the specification asks.
    """
    if version == 1:
        return build_v1(ip_port(source), ip_port(destination))
    if version == 2:
        return build_v2(ip_port(source), ip_port(destination))
    raise ValueError(f"PROXY protocol version must be 1 or 2, not {shown(version)}")


def _peer_ip(address: IAddress | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    pair = ip_port(address)
    if pair is None:
        return None
    ip = ipaddress.ip_address(pair[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _twisted_address(address: Address | None) -> IAddress | None:
    if address is None:
        return None
    if isinstance(address, str):
        return UNIXAddress(address.encode("utf-8", "surrogateescape"))
    host, port = address
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


class ProxyHeaderReader:
    """
    Reads the PROXY header at the start of one connection, fed in chunks of
    any size.

    :param info: what is known of the connection; ``info.peer`` decides trust.
    :param trusted: the :class:`Trust` (or, as before, the networks) whose
        peers may (and must) send a header.
    :ivar info: ``info``, with ``proxy_source``/``proxy_destination`` set once
        a header with addresses has been read.
    :ivar header: the parsed header, once there is one.
    """

    __slots__ = ("_buffer", "header", "info", "trusted")

    def __init__(self, info: ConnectionInfo, trusted: Trust | Sequence[_Network]) -> None:
        self.info = info
        if not isinstance(trusted, Trust):
            trusted = Trust(tuple(trusted))
        self.trusted = trusted.trusts(info.peer)
        self._buffer = b""
        self.header: ProxyHeader | None = None

    def feed(self, data: bytes) -> bytes | None:
        """
        Take the next chunk.

        :returns: ``None`` while the header (or, from an untrusted peer, the
            question whether there is one) is undecided; then the bytes that
            follow the header, to be sniffed.
        :raises ValueError: the connection must be refused; the message says why.
        """
        buffer = self._buffer + data if self._buffer else data
        if not self.trusted:
            sig = signature(buffer)
            if sig is Signature.NO:
                self._buffer = b""
                return buffer
            if sig is Signature.YES:
                raise ValueError(f"PROXY protocol header from untrusted peer {address_text(self.info.peer)}")
            self._buffer = buffer
            return None
        header = parse(buffer)  # its ProxyProtocolError is a ValueError with the reason
        if header is None:
            # parse() refuses a v1 line past 107 bytes and a v2 length past
            # MAX_V2_PAYLOAD, so what is held here stays bounded.
            self._buffer = buffer
            return None
        self._buffer = b""
        self.header = header
        if header.source is not None:
            self.info = self.info.evolve(
                proxy_source=_twisted_address(header.source),
                proxy_destination=_twisted_address(header.destination),
            )
        return buffer[header.length :]

    def finish(self) -> bytes:
        """
        The peer stopped (end of stream, or the sniff timeout) before the
        header was decided.

        :returns: what an untrusted peer sent (a signature's first bytes that
            never became one), to be sniffed as usual.
        :raises ValueError: a trusted peer's header is missing or cut short.
        """
        held, self._buffer = self._buffer, b""
        if self.trusted:
            if held:
                raise ValueError(f"PROXY header cut short after {len(held)} bytes")
            raise ValueError("no PROXY header")
        return held
