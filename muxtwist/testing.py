"""
Helpers for testing your own rules in trial, without sockets.

:func:`route` answers "which rule would these bytes go to?";
:class:`MemoryConnection` pumps bytes through a real :class:`SniffingFactory`
on an in-memory transport, with a :class:`~twisted.internet.task.Clock` for
the sniff timeout::

    conn = MemoryConnection(SniffingFactory(rules, reactor=clock), clock=clock)
    conn.send(b"GET / HTTP/1.1\\r\\nHost: a.test\\r\\n\\r\\n")
    assert conn.rule_name == "a-site"
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, IProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.python.failure import Failure

from muxtwist.interfaces import ConnectionInfo, Verdict
from muxtwist.sniffing import Outcome, Rule, SniffingFactory, SniffingProtocol

__all__ = ["MemoryConnection", "Route", "route"]


@attrs.frozen
class Route:
    """
    Where bytes would go: ``rule`` (``None`` if no rule wins), every rule's
    verdict up to the deciding one, and a sentence saying why.
    """

    rule: Rule | None
    verdicts: tuple[tuple[str, Verdict], ...]
    reason: str

    @property
    def name(self) -> str | None:
        """The winning rule's name, or ``None``."""
        return None if self.rule is None else self.rule.name


def route(rules: Sequence[Rule], data: bytes, info: ConnectionInfo | None = None, *, final: bool = False) -> Route:
    """
    Which of ``rules`` the sniffer would hand a connection to, given that it
    has sent ``data``. With ``final=True``, as at a timeout or end of stream:
    NEED_MORE counts as NO_MATCH.
    """
    info = info if info is not None else ConnectionInfo()
    verdicts: list[tuple[str, Verdict]] = []
    for rule in rules:
        verdict = rule.matcher.match(data, info)
        verdicts.append((rule.name, verdict))
        if verdict is Verdict.MATCH:
            return Route(rule, tuple(verdicts), f"rule {rule.name!r} matches")
        if verdict is Verdict.NEED_MORE and not final:
            return Route(None, tuple(verdicts), f"rule {rule.name!r} needs more bytes to decide")
    if final and not data:
        return Route(None, tuple(verdicts), "no bytes: the connection goes to on_timeout")
    return Route(None, tuple(verdicts), "no rule matches: the connection goes to on_no_match")


class _MemoryTransport(StringTransportWithDisconnection):
    """Ends as Twisted's own transports do: its ``connectionLost`` tells its protocol."""

    def loseConnection(self) -> None:
        if self.connected:
            self.connected = False
            self.connectionLost(Failure(ConnectionDone("Bye.")))

    def connectionLost(self, reason: Failure) -> None:
        self.protocol.connectionLost(reason)


_PEER = IPv4Address("TCP", "192.0.2.1", 40000)
_LOCAL = IPv4Address("TCP", "127.0.0.1", 3000)


class MemoryConnection:
    """
    One client connection to ``factory`` on an in-memory transport.

    :ivar transport: the ``StringTransport``; ``transport.value()`` is what
        the server wrote.
    :ivar clock: the ``Clock`` given to the factory as its reactor, if any.
    """

    def __init__(
        self,
        factory: SniffingFactory,
        *,
        clock: Clock | None = None,
        peer: IAddress = _PEER,
        local: IAddress = _LOCAL,
    ) -> None:
        self.clock = clock
        self.transport = _MemoryTransport(hostAddress=local, peerAddress=peer)  # type: ignore[no-untyped-call]
        protocol = factory.buildProtocol(peer)
        if protocol is None:
            raise RuntimeError("the factory refused the connection")
        self.sniffer: SniffingProtocol = protocol
        self.transport.protocol = protocol
        protocol.makeConnection(self.transport)

    @property
    def protocol(self) -> IProtocol:
        """Whatever receives data now: the sniffer, then the winner."""
        proto: IProtocol = self.transport.protocol
        return proto

    @property
    def rule_name(self) -> str | None:
        """The rule (or ``on_timeout``/``on_no_match``) that got the connection, once decided."""
        return None if self.sniffer.sniffing else self.sniffer.rule_name

    @property
    def outcome(self) -> Outcome | None:
        return self.sniffer.outcome

    def send(self, data: bytes, *, chunk_size: int | None = None) -> None:
        """Deliver ``data`` as the transport would, optionally in chunks."""
        step = chunk_size or max(len(data), 1)
        for i in range(0, len(data), step):
            if not self.transport.connected:
                return
            self.protocol.dataReceived(data[i : i + step])

    def advance(self, seconds: float) -> None:
        """Move the clock on (the sniff timeout, the quiet evaluation)."""
        if self.clock is None:
            raise RuntimeError("no clock was given")
        self.clock.advance(seconds)

    def half_close(self) -> None:
        """The client shuts down its writing side."""
        proto = self.protocol
        if IHalfCloseableProtocol.providedBy(proto):
            proto.readConnectionLost()
        else:
            self.transport.loseConnection()

    def close(self) -> None:
        """The client goes away."""
        if self.transport.connected:
            self.transport.connected = False
            self.transport.connectionLost(Failure(ConnectionDone()))
