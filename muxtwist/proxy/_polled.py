"""
A client connection read by the splice poller from its accept on (Linux).

A connection that a listener of proxies only (every rule and fallback a
:class:`~muxtwist.proxy.Proxy`) accepts will be relayed, and a spliced
relay reads its socket in the splice poller (:mod:`muxtwist.proxy._poller`)
anyway. As a Twisted transport registered with the reactor, the socket
costs the reactor's dispatch of its first bytes (a logging context, an
exception guard) and a registration that the relay then takes out again.
:class:`PolledServer` is Twisted's own TCP server transport, every method
of it, except where it waits: its readiness comes from the splice poller
instead of the reactor, so the sniffer, the relay and the splice use it as
any TCP transport, and the splice takes its socket over in the same
``epoll``, never through the reactor's. Dispatch follows the reactor's (a returned reason
disconnects as the reactor would, half-close included; an exception is
logged and disconnects).

Unlike a reactor's transport, one not being read (paused, or after its end
of stream) stays in the poller for errors alone, so that a client that
resets then, while its relay waits for the backend or the backend takes
nothing, is lost at once, as if a read had found the reset.

A connection is sniffed under the rules of its accept (a reload's new
rules are for new connections), so it is handed to a relay or closed. Any
protocol would run on it all the same: the transport is Twisted's, only
the dispatch of its readiness differs (no logging context around it).
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from twisted.internet import main, tcp
from twisted.logger import Logger
from twisted.python.failure import Failure

from muxtwist._twisted import disconnect_selectable
from muxtwist.proxy._poller import Poller, poller_for

__all__ = ["PolledServer", "server_transport"]

log = Logger(namespace="muxtwist.proxy")


class _Readiness:
    """The poller's end of a :class:`PolledServer`: what it waits for, and the reactor's dispatch rules."""

    __slots__ = ("errors", "events", "fd", "reading", "transport", "writing")

    def __init__(self, transport: PolledServer, fd: int) -> None:
        self.transport = transport
        self.fd = fd
        self.reading = False
        self.writing = False
        self.events = 0
        #: neither read nor written, it stays registered to hear of a reset.
        self.errors = True

    def doRead(self) -> None:
        self._dispatch(True)

    def doWrite(self) -> None:
        self._dispatch(False)

    def doError(self) -> None:
        # Whether or not a loseConnection is under way (one waiting for a
        # paused producer): returning without a change here would leave the
        # error reported at every poll.
        transport = self.transport
        try:
            code = transport.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as e:
            code = e.errno or 0
        if code:
            # A reset (or a timeout) while not read: lost, as a read would have said.
            self._disconnect(main.CONNECTION_LOST, True)
            return
        # A hang-up with no error: the client's end of stream came after ours
        # (both ways shut), to be read once its relay reads it again. It
        # would be reported at every poll: from now on the socket is polled
        # only while it is read or written.
        self.errors = False
        transport._poller.update(self)

    def _dispatch(self, is_read: bool) -> None:
        transport = self.transport
        try:
            why = transport.doRead() if is_read else transport.doWrite()  # type: ignore[no-untyped-call]
        except BaseException:
            why = sys.exc_info()[1]
            log.failure("{transport!r} failed", Failure(), transport=transport)
        if why:
            self._disconnect(why, is_read)

    def _disconnect(self, why: object, is_read: bool) -> None:
        transport = self.transport
        # The reactor stops reading first (an end of stream would be
        # reported again and again); its own removeReader does nothing here.
        transport.stopReading()
        try:
            disconnect_selectable(transport.reactor, transport, why, is_read)
        except BaseException:
            # The reactor logs what its disconnect raised (its protocol's
            # connectionLost); raised on to the poller, it would end the
            # transport again, which does nothing: the error was lost.
            log.failure("{transport!r} failed while ending", Failure(), transport=transport)

    def connectionLost(self, reason: Failure) -> None:
        # The reactor is stopping and disconnects everything in the poller.
        self.transport.connectionLost(reason)


class PolledServer(tcp.Server):
    """A Twisted TCP server transport whose readiness comes from the splice poller, not the reactor."""

    def __init__(
        self, sock: socket.socket, protocol: Any, client: Any, server: Any, sessionno: int, reactor: Any
    ) -> None:
        self._poller: Poller = poller_for(reactor)
        self._readiness = _Readiness(self, sock.fileno())
        super().__init__(sock, protocol, client, server, sessionno, reactor)

    # Where Twisted's transport asks the reactor, it asks the poller.

    def startReading(self) -> None:
        readiness = self._readiness
        if not readiness.reading:
            readiness.reading = True
            self._poller.update(readiness)

    def stopReading(self) -> None:
        readiness = self._readiness
        if readiness.reading:
            readiness.reading = False
            self._poller.update(readiness)

    def startWriting(self) -> None:
        readiness = self._readiness
        if not readiness.writing:
            readiness.writing = True
            self._poller.update(readiness)

    def stopWriting(self) -> None:
        readiness = self._readiness
        if readiness.writing:
            readiness.writing = False
            self._poller.update(readiness)

    def connectionLost(self, reason: Failure) -> None:
        readiness = self._readiness
        readiness.reading = readiness.writing = False
        # Twisted's connectionLost closes the socket at once, which takes it
        # out of the poller's epoll: no system call of ours for that.
        self._poller.forget(readiness)
        super().connectionLost(reason)


def server_transport(
    sock: socket.socket, protocol: Any, client: Any, server: Any, sessionno: int, reactor: Any
) -> tcp.Server:
    """
    A ``tcp.Port``'s transport class, choosing per connection: a
    :class:`PolledServer` for a sniffer whose rules only relay, Twisted's
    ``tcp.Server`` otherwise.
    """
    ruleset = getattr(protocol, "_ruleset", None)
    if ruleset is not None and ruleset.relays_only:
        return PolledServer(sock, protocol, client, server, sessionno, reactor)
    return tcp.Server(sock, protocol, client, server, sessionno, reactor)
