"""
In-memory pieces for UDP tests: a listening port that records what it
sends, a recording DatagramProtocol target, and a mux on a Clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from zope.interface import implementer

from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers.datagram import datagrams_of
from muxtwist.metrics import Metrics
from muxtwist.sniffing import Rule
from muxtwist.udp.mux import UDPMux


class _Handle:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        self.sent.append((data, addr))
        return len(data)


class FakePort:
    """A listening UDP port that records every datagram sent from it."""

    def __init__(self, port: int = 4433) -> None:
        self.handle = _Handle()
        self.address = IPv4Address("UDP", "127.0.0.1", port)

    @property
    def sent(self) -> list[tuple[bytes, tuple[str, int]]]:
        return self.handle.sent

    def getHost(self) -> IPv4Address:
        return self.address

    def getHandle(self) -> _Handle:
        return self.handle


class Recorder(DatagramProtocol):
    """A target that records what it gets and can answer."""

    def __init__(self) -> None:
        self.got: list[tuple[bytes, tuple[str, int]]] = []
        self.started = 0
        self.stopped = 0

    def startProtocol(self) -> None:
        self.started += 1

    def stopProtocol(self) -> None:
        self.stopped += 1

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.got.append((datagram, addr))

    def by(self, addr: tuple[str, int]) -> list[bytes]:
        return [d for d, a in self.got if a == addr]


class Echo(DatagramProtocol):
    """Answers every datagram with itself, upper-cased."""

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        assert self.transport is not None
        self.transport.write(datagram.upper(), addr)


@implementer(IMatcher)
@attrs.define
class Counting:
    """
    MATCH once the flow has ``datagrams`` datagrams starting with ``prefix``;
    NO_MATCH on a first datagram that does not; counts its calls.
    """

    prefix: bytes
    datagrams: int = 1
    name: str = "counting"
    calls: int = 0

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        self.calls += 1
        grams = datagrams_of(data, info)
        if not grams[0].startswith(self.prefix):
            return Verdict.NO_MATCH
        return Verdict.MATCH if len(grams) >= self.datagrams else Verdict.NEED_MORE


def make_mux(rules: Sequence[Rule], **kwargs: Any) -> tuple[UDPMux, FakePort, Clock]:
    """A started mux on a fake port, with its own Clock and Metrics."""
    clock = Clock()
    kwargs.setdefault("metrics", Metrics())
    mux = UDPMux(rules, reactor=clock, **kwargs)
    port = FakePort()
    mux.protocol.makeConnection(port)  # type: ignore[arg-type]
    return mux, port, clock
