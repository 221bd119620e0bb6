"""
The admin site's ``Site``: at most so many connections open at once, so
that clients holding connections (idle ones, or a request sent a byte at a
time) cannot use up the descriptors of the process serving it, which under
``--workers`` is the parent that starts the workers again.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from twisted.web.server import Site

from muxtwist._limits import address_text
from muxtwist._text import LogThrottle
from muxtwist._twisted import default_reactor

__all__ = ["MAX_CONNECTIONS", "AdminSite"]

log = Logger(namespace="muxtwist.admin")

#: Connections the admin site holds open at once by default; more are closed as they come.
MAX_CONNECTIONS = 128


class AdminSite(Site):
    """
    A ``Site`` that closes a new connection at once while it holds
    ``max_connections`` (logged at most once a second, with the count of
    those not logged).
    """

    def __init__(self, resource: IResource, *, max_connections: int = MAX_CONNECTIONS, reactor: Any = None) -> None:
        if not isinstance(max_connections, int) or isinstance(max_connections, bool) or max_connections < 1:
            raise ValueError(f"admin max_connections must be a positive integer, got {max_connections!r}")
        reactor = default_reactor(reactor)
        super().__init__(resource, reactor=reactor)  # type: ignore[no-untyped-call]
        self.max_connections = max_connections
        #: Connections open now.
        self.open_connections = 0
        self._throttle = LogThrottle(reactor)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if self.open_connections >= self.max_connections:
            suppressed = self._throttle.admit("full")
            if suppressed is not None:
                log.warn(
                    "admin: closed a connection from {peer}: {open} open, the most the admin site holds"
                    " ({suppressed} more closed since the last line)",
                    peer=address_text(addr),
                    open=self.open_connections,
                    suppressed=suppressed,
                )
            return None
        channel = super().buildProtocol(addr)  # type: ignore[no-untyped-call]
        if channel is None:
            return None
        self.open_connections += 1
        lost = channel.connectionLost

        def connection_lost(reason: Failure) -> None:
            self.open_connections -= 1
            lost(reason)

        channel.connectionLost = connection_lost
        return channel
