"""
The relay of a :class:`~muxtwist.proxy.Proxy` with ``idle_timeout``: it
closes both ends once no byte has moved either way for that long.

The bytes moved are looked at ``_TICKS`` times per ``idle_timeout``, never
per chunk, so the timer costs nothing on the data path.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from muxtwist.interfaces import ConnectionInfo
from muxtwist.proxy._relay import Relay, _RelayOwner

__all__ = ["IdleTimedRelay"]

log = Logger(namespace="muxtwist.proxy")


class IdleTimedRelay(Relay):
    """A relay that closes both ends after ``idle_timeout`` seconds without a byte either way."""

    _TICKS = 4

    def __init__(self, proxy: _RelayOwner, info: ConnectionInfo, rule_name: str) -> None:
        super().__init__(proxy, info, rule_name)
        self._seen = -1
        self._quiet_ticks = 0
        self._idle_call: IDelayedCall | None = None

    def _linked(self) -> None:
        self._tick_later()

    def _tick_later(self) -> None:
        assert self.proxy.idle_timeout is not None
        self._idle_call = self.proxy._reactor.callLater(self.proxy.idle_timeout / self._TICKS, self._tick)

    def _tick(self) -> None:
        self._idle_call = None
        moved = self.bytes_in + self.bytes_out
        if moved != self._seen:
            self._seen = moved
            self._quiet_ticks = 0
        else:
            self._quiet_ticks += 1
            if self._quiet_ticks >= self._TICKS:
                log.info(
                    "rule {rule}: closing idle relay {client} -> {backend}",
                    rule=self.rule_name,
                    client=self.info.source,
                    backend=self.backend.description if self.backend else None,
                )
                self._unsplice()
                for transport in (self.transport, self.side.transport if self.side else None):
                    if transport is not None:
                        transport.unregisterProducer()  # type: ignore[attr-defined]
                        self._close(transport)
                return
        self._tick_later()

    def _stop_timers(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
