"""
Ends of a relay that were closed and do not go away: each is aborted once it
has stayed ``close_timeout`` seconds without its peer taking a byte.

A TLS end closes only when its peer answers our ``close_notify`` (a client
that never does would hold its socket for ever); a reader that stopped
reading keeps what we still have to write. An end still draining to a slow
reader gets more time, as long as the bytes it holds go down.
"""

from __future__ import annotations

from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IDelayedCall, ITransport
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol

from muxtwist._transports import abort
from muxtwist._twisted import tls_unsent_bytes, unsent_bytes
from muxtwist.interfaces import ConnectionInfo

__all__ = ["ClosingEnds"]

log = Logger(namespace="muxtwist.proxy")


class _Closer(TypingProtocol):
    """What :class:`ClosingEnds` reads of its relay."""

    transport: ITransport | None
    rule_name: str
    info: ConnectionInfo

    def _gone(self, transport: ITransport) -> bool: ...


def _wire_unsent(transport: object) -> int:
    """Bytes a transport still holds to put on the wire, under its TLS layer if it has one."""
    if isinstance(transport, TLSMemoryBIOProtocol):
        return (unsent_bytes(transport.transport) or 0) + (tls_unsent_bytes(transport) or 0)
    return unsent_bytes(transport) or 0


class ClosingEnds:
    """
    The ends one relay has closed that have not gone yet, with the bytes
    each still held to write at the last look; made on the relay's first
    close, so a relay that ends cleanly never has one.
    """

    __slots__ = ("_call", "_held", "_reactor", "_relay", "_stopped", "_timeout")

    def __init__(self, relay: _Closer, reactor: Any, timeout: float) -> None:
        self._relay = relay
        self._reactor = reactor
        self._timeout = timeout
        self._held: dict[ITransport, int] = {}
        self._call: IDelayedCall | None = None
        self._stopped = False

    def add(self, transport: ITransport) -> None:
        """Watch ``transport``, which the relay has just closed."""
        if self._stopped or transport in self._held:
            return
        self._held[transport] = _wire_unsent(transport)
        if self._call is None:
            self._call = self._reactor.callLater(self._timeout, self._check)

    def stop(self) -> None:
        """The relay has ended: forget every end and cancel the timer."""
        self._stopped = True
        self._held.clear()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _check(self) -> None:
        self._call = None
        relay = self._relay
        for transport, before in list(self._held.items()):
            if relay._gone(transport):
                del self._held[transport]
                continue
            now = _wire_unsent(transport)
            if 0 < now < before:
                # Still draining to a slow reader: it gets more time.
                self._held[transport] = now
                continue
            del self._held[transport]
            log.info(
                "rule {rule}: {end} of {client}'s relay still open {seconds}s after it was closed; aborted",
                rule=relay.rule_name,
                end="client end" if transport is relay.transport else "backend end",
                client=relay.info.source,
                seconds=self._timeout,
            )
            abort(transport)
        if self._held and not self._stopped:
            self._call = self._reactor.callLater(self._timeout, self._check)
