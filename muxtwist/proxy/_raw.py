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
ordinary Twisted transport, as it does for every other backend: the
backend side's factory, :class:`SpliceFactory`, decides which.
"""

from __future__ import annotations

import socket
import struct
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import error
from twisted.internet.interfaces import IProtocol
from twisted.python.failure import Failure

from muxtwist.proxy._backends import _OneProtocol
from muxtwist.proxy._poller import poller_for

__all__ = ["RawTransport", "SpliceFactory"]

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

    # What a spliced relay's start and stop ask of a transport: it is never the reactor's.

    def stopReading(self) -> None:
        pass

    def stopWriting(self) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    # Closing

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


class _Taker(TypingProtocol):
    """What :class:`SpliceFactory` asks of the relay whose backend side it builds."""

    _trying: Any

    def _can_splice(self) -> bool: ...


class SpliceFactory(_OneProtocol):
    """
    The factory of a backend side whose relay may splice: once connected,
    the socket is taken as it is (a :class:`RawTransport`) when the relay
    can splice at once, and adopted by the reactor otherwise.
    """

    noisy = False

    def __init__(self, side: Any, reactor: Any) -> None:
        super().__init__(side)
        self._reactor = reactor
        #: where the connect waits (muxtwist._connect): the splice's own poller.
        self.connect_poller = poller_for(reactor)

    def take_socket(self, sock: socket.socket) -> IProtocol | None:
        side: Any = self._protocol
        relay: _Taker = side.relay
        if relay._trying is not side or not relay._can_splice():
            return None
        side.makeConnection(RawTransport(sock, side, self._reactor))
        return side  # type: ignore[no-any-return]
