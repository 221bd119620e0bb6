"""
:class:`Listener`: one listening endpoint of ``MuxService`` and the
sniffing factory behind it.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints, tcp
from twisted.logger import Logger

from muxtwist._twisted import listen_errors_raise, listening, set_port_log_observer
from muxtwist.metrics import EmfileThrottle, Metrics
from muxtwist.proxy import _splice
from muxtwist.proxy._polled import server_transport
from muxtwist.sniffing import SniffingFactory

__all__ = ["Listener"]

log = Logger(namespace="muxtwist.service")  # as before the move: log filters and greps keep working


class Listener(StreamServerEndpointService):
    """
    One listening endpoint and the :class:`SniffingFactory` behind it.

    :param inherited_fd: a listening socket made by a parent process
        (``--workers``) to adopt instead of listening on ``description``.
    """

    factory: SniffingFactory

    def __init__(
        self, description: str, factory: SniffingFactory, reactor: Any, inherited_fd: int | None = None
    ) -> None:
        if inherited_fd is None:
            endpoint = endpoints.serverFromString(reactor, description)
        else:
            probe = socket.socket(fileno=inherited_fd)
            family = probe.family
            probe.detach()  # leave the descriptor open: it was only looked at
            endpoint = endpoints.AdoptedStreamServerEndpoint(reactor, inherited_fd, family)
        super().__init__(endpoint, factory)  # type: ignore[no-untyped-call]
        self.description = description
        self.inherited_fd = inherited_fd
        self._reactor = reactor
        self.port: Any = None
        #: the port's EMFILE log observer, whose pending count the stop logs.
        self._emfile: EmfileThrottle | None = None
        listen_errors_raise(self)
        self.setName(description)  # type: ignore[no-untyped-call]

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        waiting = listening(self)
        if waiting is not None:
            waiting.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        self.port = port
        if type(port) is tcp.Port and port.transport is tcp.Server and _splice.AVAILABLE:
            # Clients of rules that only relay are read by the splice poller from their accept on.
            port.transport = server_transport  # type: ignore[assignment]
        if self.inherited_fd is not None:
            # The port listens on its own duplicate; the inherited descriptor
            # would only keep the socket open after this worker stops.
            os.close(self.inherited_fd)
            self.inherited_fd = None
        metrics = getattr(self.factory, "metrics", None)
        if isinstance(metrics, Metrics):
            self._emfile = EmfileThrottle(metrics, self._reactor)
            set_port_log_observer(port, self._emfile)
        log.info("listening on {description} at {address}", description=self.description, address=port.getHost())
        return port

    def stopService(self) -> Any:
        """Stop listening; then log the clients closed for want of descriptors not logged yet."""
        stopped = super().stopService()  # type: ignore[no-untyped-call]

        def flush(result: object) -> object:
            if self._emfile is not None:
                self._emfile.flush()
            return result

        return stopped.addBoth(flush) if stopped is not None else flush(None)
