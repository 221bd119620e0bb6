"""
What a rule can do with a connection, besides handing it to your own
factory. Every action is itself an ``IProtocolFactory``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IAddress, IProtocol
from twisted.logger import Logger
from zope.interface import implementer

from muxtwist._lazy import lazy_attributes
from muxtwist.interfaces import ConnectionInfo, IConnectionInfoFactory

if TYPE_CHECKING:
    from muxtwist.proxy import HealthCheck, Proxy
    from muxtwist.redirect import RedirectToHTTPS
    from muxtwist.tls import TerminateTLS
    from muxtwist.udp.proxy import UDPProxy

# Imported on first use: each brings in the part of Twisted it needs
# (twisted.web for the redirect, pyOpenSSL for TLS, the relays for Proxy).
_LAZY = {
    "HealthCheck": "muxtwist.proxy",
    "Proxy": "muxtwist.proxy",
    "RedirectToHTTPS": "muxtwist.redirect",
    "TerminateTLS": "muxtwist.tls",
    "UDPProxy": "muxtwist.udp.proxy",
}

__all__ = ["HealthCheck", "Proxy", "RedirectToHTTPS", "Reject", "TerminateTLS", "UDPProxy"]

log = Logger()


@implementer(IConnectionInfoFactory)
class Reject:
    """
    Close the connection at once, with a log line and a counter.

    :ivar rejected: how many connections this has closed.
    """

    def __init__(self) -> None:
        self.rejected = 0

    def __repr__(self) -> str:
        return "Reject()"

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        return self.buildProtocolForConnection(addr, ConnectionInfo(peer=addr), "")

    def buildProtocolForConnection(self, addr: IAddress, info: ConnectionInfo, rule_name: str) -> IProtocol | None:
        self.rejected += 1
        log.info("rejected {peer} (rule {rule})", peer=info.source or addr, rule=rule_name)
        return None


__getattr__, __dir__ = lazy_attributes(globals(), _LAZY)
