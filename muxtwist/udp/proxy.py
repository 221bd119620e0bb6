"""
:class:`UDPProxy`: a UDP rule target that relays each flow to a backend.

Each flow gets its own connected socket to the backend chosen for it, so
the backend sees one client per flow and its replies are told apart by
socket; they go back to the flow's remote from the listening socket. All
the flows' sockets of one proxy are read through one ``epoll`` object the
reactor watches (:class:`~muxtwist.udp._sockets.FlowSockets`), and a reply
is sent with the flow's writer (``IFlowTransport.flow_writer``). The
mux ends the flow after ``idle_timeout`` seconds without a datagram either
way (see :class:`~muxtwist.udp.interfaces.IFlowTarget`); an ICMP error from
the backend (port unreachable: ``ECONNREFUSED`` on the connected socket)
ends that flow only.
"""

from __future__ import annotations

import random
import socket
import sys
import zlib
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorFDSet
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from muxtwist._descriptions import split_description
from muxtwist._options import shown
from muxtwist._twisted import default_reactor
from muxtwist.udp._sockets import FlowSockets
from muxtwist.udp.interfaces import IFlowTarget
from muxtwist.udp.mux import MAX_DATAGRAM

__all__ = ["BALANCE", "UDPBackend", "UDPProxy", "parse_backend"]

log = Logger()

#: The ``balance`` policies.
BALANCE = ("round_robin", "least_flows", "random", "source_hash")


@attrs.define(eq=False)
class UDPBackend:
    """
    One backend address and its counters.

    :ivar active: flows relayed to it now.
    :ivar total: flows ever relayed to it.
    :ivar failures: flows ended by an ICMP error (or a socket error) from it.
    """

    description: str
    host: str
    port: int
    family: int
    active: int = 0
    total: int = 0
    failures: int = 0


def _fields(description: str) -> tuple[str, dict[str, str]]:
    """``"udp:host=a:port=1"`` -> ``("udp", {"host": "a", "port": "1"})``; ``\\:`` escapes a colon."""
    positional, named = split_description(description)
    if len(positional) > 1:
        raise ValueError(f"bad UDP backend {shown(description)}: {shown(positional[1])} is not key=value")
    return positional[0], named


def parse_backend(description: str) -> UDPBackend:
    """
    ``"udp:host=127.0.0.1:port=5300"`` (``host`` may be a name, resolved
    once now, or an IPv6 address with its colons escaped: ``host=\\:\\:1``).

    :raises ValueError: for anything else.
    """
    kind, fields = _fields(description)
    if kind not in ("udp", "udp6") or set(fields) - {"host", "port"} or "port" not in fields:
        raise ValueError(f"bad UDP backend {shown(description)}: want udp:host=ADDRESS:port=PORT")
    try:
        port = int(fields["port"])
    except ValueError:
        raise ValueError(
            f"bad UDP backend {shown(description)}: port {shown(fields['port'])} is not a number"
        ) from None
    if not 0 < port < 65536:
        raise ValueError(f"bad UDP backend {shown(description)}: port {shown(port)} out of range")
    host = fields.get("host", "::1" if kind == "udp6" else "127.0.0.1")
    family = socket.AF_INET6 if kind == "udp6" else socket.AF_UNSPEC
    try:
        found = socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM)
    except OSError as e:
        raise ValueError(f"bad UDP backend {shown(description)}: cannot resolve {shown(host)}: {e}") from None
    chosen_family, _, _, _, sockaddr = found[0]
    return UDPBackend(description, str(sockaddr[0]), port, int(chosen_family))


class _BackendSide:
    """One flow's connected, non-blocking socket to its backend (read by the proxy's :class:`FlowSockets`)."""

    __slots__ = ("addr", "backend", "closed", "deliver", "proxy", "recv", "send_", "sock")

    def __init__(self, proxy: UDPProxy, addr: tuple[str, int], backend: UDPBackend, sock: socket.socket) -> None:
        self.proxy = proxy
        self.addr = addr
        self.backend = backend
        self.sock = sock
        self.recv = sock.recv
        self.send_ = sock.send
        #: Replies go to the flow's remote through the listening socket.
        self.deliver: Any = None
        self.closed = False

    def __repr__(self) -> str:
        return f"<backend socket of {self.addr!r} to {self.backend.description}>"

    def send(self, data: bytes) -> None:
        try:
            self.send_(data)
        except ConnectionRefusedError as e:
            self.failed(e)
        except OSError as e:
            log.warn(
                "cannot send to backend {backend} for {peer}: {problem}",
                backend=self.backend.description,
                peer=self.addr,
                problem=str(e),
            )

    def failed(self, error: OSError) -> None:
        """An error on the socket (ICMP port unreachable from the backend: ``ECONNREFUSED``) ends the flow."""
        if not self.closed:
            self.backend.failures += 1
            self.proxy._backend_failed(self, error)


@implementer(IFlowTarget)
class UDPProxy(DatagramProtocol):
    """
    Relay each flow to one of ``backends``.

    :param backends: ``"udp:host=127.0.0.1:port=5300"`` or a list of them.
    :param balance: how a new flow picks its backend: ``round_robin``,
        ``least_flows`` (fewest live flows), ``random`` or ``source_hash``
        (the same client host always gets the same backend while the list
        is unchanged).
    :param idle_timeout: seconds without a datagram either way that end a flow.
    :param max_flows: the most flows relayed at once; a new flow beyond it
        is ended at once (outcome ``rejected``) and its datagrams dropped.
    :param reactor: an ``IReactorFDSet`` (``twisted.internet.reactor`` by default)
        that reads the flows' backend sockets.

    :ivar rejected: flows ended because of ``max_flows``.
    :ivar failed: flows ended by a backend error.
    """

    def __init__(
        self,
        backends: str | Sequence[str],
        *,
        balance: str = "round_robin",
        idle_timeout: float = 60.0,
        max_flows: int | None = None,
        reactor: IReactorFDSet | None = None,
    ) -> None:
        if isinstance(backends, str):
            backends = [backends]
        if not backends:
            raise ValueError("UDPProxy needs at least one backend")
        if balance not in BALANCE:
            raise ValueError(f"unknown balance {shown(balance)}; use one of {', '.join(BALANCE)}")
        if max_flows is not None and (isinstance(max_flows, bool) or not isinstance(max_flows, int) or max_flows < 1):
            raise ValueError(f"max_flows must be a positive integer or None, got {shown(max_flows)}")
        number = isinstance(idle_timeout, int | float) and not isinstance(idle_timeout, bool)
        if not number or not 0 < idle_timeout <= sys.float_info.max:
            # 0, a negative number or NaN would end every flow before its backend could answer.
            raise ValueError(f"idle_timeout must be a positive number of seconds, got {shown(idle_timeout)}")
        self._reactor: Any = default_reactor(reactor)
        self.backends = [parse_backend(b) for b in backends]
        self.balance = balance
        self.idle_timeout = idle_timeout
        self.max_flows = max_flows
        self.rejected = 0
        self.failed = 0
        self._next = 0
        self._sides: dict[tuple[str, int], _BackendSide] = {}
        self._sockets = FlowSockets(self._reactor, MAX_DATAGRAM)

    def __repr__(self) -> str:
        return f"UDPProxy({[b.description for b in self.backends]!r}, balance={self.balance!r})"

    @property
    def flows(self) -> int:
        """Flows relayed now."""
        return len(self._sides)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        side = self._sides.get(addr)
        if side is None:
            side = self._open((addr[0], addr[1]))
            if side is None:
                return
        side.send(data)

    def _choose(self, addr: tuple[str, int]) -> UDPBackend:
        backends = self.backends
        if self.balance == "round_robin":
            chosen = backends[self._next % len(backends)]
            self._next += 1
            return chosen
        if self.balance == "least_flows":
            return min(backends, key=lambda b: b.active)
        if self.balance == "random":
            return random.choice(backends)
        return backends[zlib.crc32(addr[0].encode()) % len(backends)]

    def _open(self, addr: tuple[str, int]) -> _BackendSide | None:
        if self.max_flows is not None and len(self._sides) >= self.max_flows:
            self.rejected += 1
            self.transport.end_flow(addr, outcome="rejected")  # type: ignore[union-attr]
            return None
        backend = self._choose(addr)
        try:
            sock = socket.socket(backend.family, socket.SOCK_DGRAM)
        except OSError as e:
            self._open_failed(addr, backend, e)
            return None
        try:
            sock.setblocking(False)
            # Connected: the backend's replies, and only its, reach this socket.
            sock.connect((backend.host, backend.port))
        except OSError as e:
            sock.close()
            self._open_failed(addr, backend, e)
            return None
        writer = self.transport.flow_writer(addr)  # type: ignore[union-attr]
        if writer is None:
            sock.close()
            return None
        side = _BackendSide(self, addr, backend, sock)
        side.deliver = writer
        try:
            self._sockets.add(sock.fileno(), side)
        except OSError as e:
            # No descriptor left for the epoll object (EMFILE): the flow
            # cannot be answered, so it ends like one whose socket failed.
            sock.close()
            self._open_failed(addr, backend, e)
            return None
        backend.active += 1
        backend.total += 1
        self._sides[addr] = side
        return side

    def _open_failed(self, addr: tuple[str, int], backend: UDPBackend, error: OSError) -> None:
        backend.failures += 1
        self.failed += 1
        log.warn("cannot open a socket to {backend}: {problem}", backend=backend.description, problem=str(error))
        self.transport.end_flow(addr, outcome="backend_failed")  # type: ignore[union-attr]

    def _backend_failed(self, side: _BackendSide, error: OSError) -> None:
        self.failed += 1
        log.info(
            "backend {backend} failed the flow of {peer}: {problem}",
            backend=side.backend.description,
            peer=side.addr,
            problem=str(error),
        )
        self.transport.end_flow(side.addr, outcome="backend_failed")  # type: ignore[union-attr]
        self.flow_ended(side.addr)

    def flow_ended(self, addr: tuple[str, int]) -> None:
        side = self._sides.pop(addr, None)
        if side is None or side.closed:
            return
        side.closed = True
        side.backend.active -= 1
        self._sockets.remove(side.sock.fileno())
        side.sock.close()

    def stopProtocol(self) -> None:
        for addr in list(self._sides):
            self.flow_ended(addr)
