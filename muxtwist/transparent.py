"""
Transparent proxying: connect to a backend from the client's own address.

A backend that cannot read the PROXY protocol (sshd, mail and VPN daemons)
sees the address a connection comes from. With ``Proxy(...,
transparent=True)`` that is the client's: the backend socket gets Linux's
``IP_TRANSPARENT`` (``IPV6_TRANSPARENT``), is bound to the client's address
(and port, when it is free) and then connected. Twisted has no client
endpoint that sets a socket option before ``bind``, so the connect is done
with :func:`muxtwist._connect.connect_socket`: non-blocking, and the
connected socket handed to the reactor with ``adoptStreamConnection`` (a
public ``IReactorSocket`` method).

The host must route the backend's replies, which are addressed to the
client, back to this process. Every backend socket carries the firewall
mark :data:`OUT_MARK`; the packet-marking rules turn connections carrying it
into connections whose replies get :data:`REPLY_MARK`, and a policy route
delivers packets with that mark locally. ``python -m muxtwist doctor``
(:mod:`muxtwist.doctor`) checks all of it and prints what is missing.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import ipaddress
import socket
import sys
from collections.abc import Iterator
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from zope.interface import implementer

from muxtwist._connect import connect_socket

__all__ = [
    "CAPABILITY",
    "OUT_MARK",
    "REPLY_MARK",
    "ROUTE_TABLE",
    "TransparentEndpoint",
    "TransparentUnavailable",
    "capability_not_required",
    "source_for",
    "unavailable_reason",
]

#: The mark on every packet a transparent backend socket sends (``SO_MARK``).
OUT_MARK = 0x2
#: The mark the packet-marking rules give to replies of those connections;
#: the policy route for it delivers them to this host.
REPLY_MARK = 0x1
#: The routing table holding that local route.
ROUTE_TABLE = 100

# Linux's values; the socket module names them only on some Python builds.
_IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
_IPV6_TRANSPARENT = 75
_SO_MARK = getattr(socket, "SO_MARK", 36)

#: What a process needs to set ``IP_TRANSPARENT`` and ``SO_MARK``: either
#: capability will do (Linux 5.17 and later; before, ``SO_MARK`` takes
#: ``CAP_NET_ADMIN`` only).
CAPABILITY = "CAP_NET_RAW or CAP_NET_ADMIN"


def _how_to_fix(capability: str) -> str:
    return (
        f"run muxtwist as root, or give it {capability} (systemd: AmbientCapabilities={capability}; "
        f"otherwise: setcap {capability.lower()}+ep on the Python binary)"
    )


class TransparentUnavailable(ValueError):
    """``transparent=True`` cannot work on this platform or in this process."""


_capability_not_required = contextvars.ContextVar("_capability_not_required", default=False)


@contextlib.contextmanager
def capability_not_required() -> Iterator[None]:
    """
    Within this block, :func:`unavailable_reason` does not count a missing
    capability: ``doctor`` loads the rules to check the host, and reports
    the capability as one finding among the others.
    """
    token = _capability_not_required.set(True)
    try:
        yield
    finally:
        _capability_not_required.reset(token)


def unavailable_reason() -> str | None:
    """
    Why transparent proxying cannot work here, in one line, or ``None`` if it can.

    Tried for real: a socket is given ``IP_TRANSPARENT`` and ``SO_MARK``,
    which the kernel allows with :data:`CAPABILITY`.
    """
    if not sys.platform.startswith("linux"):
        return f"transparent=True needs Linux (IP_TRANSPARENT); this is {sys.platform}"
    if _capability_not_required.get():
        return None
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    option = "IP_TRANSPARENT"
    try:
        s.setsockopt(socket.SOL_IP, _IP_TRANSPARENT, 1)
        option = "SO_MARK"
        s.setsockopt(socket.SOL_SOCKET, _SO_MARK, OUT_MARK)
    except PermissionError:
        if option == "SO_MARK":
            # IP_TRANSPARENT was allowed, so the process has CAP_NET_RAW: a
            # kernel older than 5.17 takes only CAP_NET_ADMIN for SO_MARK.
            return (
                "transparent=True: this kernel lets only CAP_NET_ADMIN set SO_MARK, which this process lacks; "
                + _how_to_fix("CAP_NET_ADMIN")
            )
        return (
            f"transparent=True needs {CAPABILITY} (to set IP_TRANSPARENT and SO_MARK), which this process lacks; "
            + _how_to_fix("CAP_NET_RAW")
        )
    except OSError as e:
        return f"transparent=True: the kernel refused {option} ({e.strerror or e})"
    finally:
        s.close()
    return None


def source_for(backend_host: str, client: tuple[str, int]) -> tuple[str, int] | None:
    """
    The address and port to connect to ``backend_host`` from, for a client
    at ``client``; ``None`` when the two are of different IP versions.

    A client that reached a dual-stack (``::``) listener over IPv4 has an
    IPv4-mapped address (``::ffff:192.0.2.7``): it is the IPv4 address it
    stands for that an IPv4 backend is connected from.
    """
    try:
        address = ipaddress.ip_address(client[0])
        backend = ipaddress.ip_address(backend_host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.version != backend.version:
        return None
    return str(address), client[1]


def _transparent_socket(family: int, source: tuple[str, int]) -> socket.socket:
    """A non-blocking socket with IP(V6)_TRANSPARENT, bound to ``source`` (or its host, if the port is taken)."""
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, _IPV6_TRANSPARENT, 1)
        else:
            s.setsockopt(socket.SOL_IP, _IP_TRANSPARENT, 1)
        s.setsockopt(socket.SOL_SOCKET, _SO_MARK, OUT_MARK)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(source)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            # The client's port is taken on this host (a client on this very
            # machine, say): keep its address, let the kernel pick a port.
            s.bind((source[0], 0))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


@implementer(IStreamClientEndpoint)
class TransparentEndpoint:
    """
    Connect to ``host:port`` from ``source`` (the client's address and port).

    :param reactor: an ``IReactorFDSet`` and ``IReactorSocket`` (every POSIX
        reactor Twisted ships, the asyncio one included).
    """

    def __init__(self, reactor: Any, host: str, port: int, source: tuple[str, int]) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._source = source

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        source = source_for(self._host, self._source)
        if source is None:
            return defer.fail(
                TransparentUnavailable(
                    f"cannot connect to {self._host} from {self._source[0]}: the client and the backend "
                    "use different IP versions"
                )
            )
        try:
            sock = _transparent_socket(family, source)
        except OSError as e:
            return defer.fail(e)

        def any_port() -> socket.socket:
            # The connection from the client's port to this backend exists
            # already (the same client through another listener, or a NAT
            # that maps several of its connections to one port): only the
            # address has to be the client's.
            return _transparent_socket(family, (source[0], 0))

        return connect_socket(self._reactor, sock, (self._host, self._port), protocolFactory, busy=any_port)
