"""
A backend socket that a spliced relay owns from its ``connect`` on (Linux).

A spliced relay (:mod:`muxtwist.proxy._splice`) reads and writes the
backend's socket itself; a Twisted transport for it would only be built,
registered with the reactor, unregistered again for the splice, and torn
down through Twisted's ``connectionLost`` chain at the end. When the
connect finishes and the relay can splice at once, the socket is given to
the relay as a :class:`RawTransport` instead: the few transport methods the
relay and its timers call, over the socket, and nothing registered with
the reactor. Where the relay cannot splice (the client half-closed or has
bytes still queued), :mod:`muxtwist._connect` adopts the socket as an
ordinary Twisted transport, as it does for every other backend.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from twisted.internet import address, error
from twisted.internet.interfaces import IProtocol
from twisted.python.failure import Failure

__all__ = ["RawTransport"]

_LINGER_ABORT = struct.pack("ii", 1, 0)


class RawTransport:
    """
    The backend end of a spliced relay: a connected, non-blocking socket
    and the transport calls a relay makes on its backend.

    Closing (:meth:`loseConnection`, :meth:`abortConnection`) closes the
    socket at once and tells the protocol one reactor turn later, as Twisted
    does; :meth:`connectionLost` (the splice's end) closes it and tells the
    protocol now. The protocol is told once.
    """

    __slots__ = ("connected", "disconnected", "disconnecting", "protocol", "reactor", "socket")

    def __init__(self, sock: socket.socket, protocol: IProtocol, reactor: Any) -> None:
        self.socket: socket.socket | None = sock
        self.protocol = protocol
        self.reactor = reactor
        self.connected = True
        self.disconnecting = False
        self.disconnected = False

    def __repr__(self) -> str:
        return f"<RawTransport fd={self.fileno()}>"

    def fileno(self) -> int:
        return self.socket.fileno() if self.socket is not None else -1

    def getPeer(self) -> address.IPv4Address | address.IPv6Address | None:
        return self._address(socket.socket.getpeername)

    def getHost(self) -> address.IPv4Address | address.IPv6Address | None:
        return self._address(socket.socket.getsockname)

    def _address(self, which: Any) -> address.IPv4Address | address.IPv6Address | None:
        sock = self.socket
        if sock is None:
            return None
        try:
            found = which(sock)
        except OSError:
            return None
        if sock.family == socket.AF_INET6:
            return address.IPv6Address("TCP", *found)
        return address.IPv4Address("TCP", *found)

    # What a spliced relay's start and stop ask of a transport: it is never the reactor's.

    def stopReading(self) -> None:
        pass

    def stopWriting(self) -> None:
        pass

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    # Closing

    def loseWriteConnection(self) -> None:
        """Shut the writing side (a FIN); the socket stays open for reading."""
        sock = self.socket
        if sock is None or self.disconnecting:
            return
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def loseConnection(self) -> None:
        """Close the socket; the protocol hears of it in the next reactor turn."""
        # Called on every relay's end, when the splice has closed it already: no Failure made then.
        if not (self.disconnecting or self.disconnected):
            self._close_later(Failure(error.ConnectionDone()), abort=False)

    def abortConnection(self) -> None:
        """Reset the connection; the protocol hears of it in the next reactor turn."""
        if not (self.disconnecting or self.disconnected):
            self._close_later(Failure(error.ConnectionAborted()), abort=True)

    def _close_later(self, reason: Failure, abort: bool) -> None:
        self.disconnecting = True
        self._close_socket(abort)
        self.reactor.callLater(0, self.connectionLost, reason)

    def _close_socket(self, abort: bool) -> None:
        sock, self.socket = self.socket, None
        if sock is None:
            return
        if abort:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
            except OSError:
                pass
        sock.close()

    def connectionLost(self, reason: Failure) -> None:
        """The connection is over: the socket is closed, and the protocol told (once)."""
        if self.disconnected:
            return
        self.disconnected = True
        self.connected = False
        self.disconnecting = True
        self._close_socket(abort=False)
        self.protocol.connectionLost(reason)
