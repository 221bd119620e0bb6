"""
The in-process services the reliability server routes to: an echo that
first names itself, so a client can tell which rule it reached, and a
diagnostics reply with the server's open descriptors, pending timers and
memory, for the leak checks.
"""

from __future__ import annotations

import json
import os

from twisted.internet.interfaces import IAddress, IProtocol
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from muxtwist.default import Echo
from muxtwist.interfaces import ConnectionInfo, IConnectionInfoFactory

__all__ = ["Diag", "NamedEcho", "diagnostics"]


def _host(address: IAddress | None) -> str:
    return str(getattr(address, "host", "-"))


class _Echo(Echo):
    """Write ``"<service> <source host>\\n"``, then echo; close once the client has finished sending."""

    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting

    def connectionMade(self) -> None:
        self.transport.write(self.greeting)  # type: ignore[union-attr]


@implementer(IConnectionInfoFactory)
class NamedEcho:
    """An echo service that says its name and the source it was told, before echoing."""

    def __init__(self, name: str) -> None:
        self.name = name

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def buildProtocol(self, addr: IAddress) -> IProtocol:
        return self.buildProtocolForConnection(addr, ConnectionInfo(peer=addr), "")

    def buildProtocolForConnection(self, addr: IAddress, info: ConnectionInfo, rule_name: str) -> IProtocol:
        return _Echo(f"{self.name} {_host(info.source)}\n".encode())


def diagnostics() -> dict[str, int]:
    """This process's open descriptors, pending delayed calls and resident memory (KiB)."""
    from twisted.internet import reactor

    rss = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "delayed_calls": len(reactor.getDelayedCalls()),
        "rss_kib": rss,
    }


class _DiagProtocol(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(json.dumps(diagnostics()).encode() + b"\n")  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


@implementer(IConnectionInfoFactory)
class Diag:
    """Answer every connection with :func:`diagnostics` as one JSON line, then close."""

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def buildProtocol(self, addr: IAddress) -> IProtocol:
        return _DiagProtocol()

    def buildProtocolForConnection(self, addr: IAddress, info: ConnectionInfo, rule_name: str) -> IProtocol:
        return _DiagProtocol()
