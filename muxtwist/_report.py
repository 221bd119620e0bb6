"""
Reporting the end of connections: the ``connection_end`` log as an
:class:`~muxtwist.interfaces.IConnectionObserver`, and a fan-out that tells
several observers (metrics and the log) the same thing.

The sniffer builds one :class:`ConnectionEnd` per connection and hands it to
its observer; neither the sniffer nor the relays know who listens.
"""

from __future__ import annotations

from twisted.logger import Logger
from zope.interface import implementer

from muxtwist.interfaces import ConnectionEnd, IConnectionObserver

__all__ = ["ConnectionLog", "Observers"]

# The sniffer's namespace: filters and log pipelines select connection_end by it.
log = Logger(namespace="muxtwist.sniffing")

#: The ``log_format`` of the ``connection_end`` event; its fields are those of
#: :class:`ConnectionEnd` (``bytes_in`` and ``bytes_out`` are the sniffed
#: bytes) and ``how``. :mod:`muxtwist._textlog` writes the same text faster.
CONNECTION_END = (
    "connection {peer} -> port {local_port} ended: {outcome}, rule {rule}, "
    "sniffed {sniff_time:.4f}s, {bytes_in} bytes in / {bytes_out} out while sniffing, {duration:.3f}s"
    "{how}"
)


@implementer(IConnectionObserver)
class ConnectionLog:
    """
    Logs one ``connection_end`` event per connection (``log_event`` field),
    with every :class:`ConnectionEnd` field, for JSON logs and log pipelines.

    Refusals are not logged here: the limit that refuses logs them, throttled,
    with the peer and the limit's value, which this interface does not carry.
    """

    def connection_end(self, end: ConnectionEnd) -> None:
        # The event's field names predate ConnectionEnd (bytes_in and
        # bytes_out are the sniffed bytes); log pipelines read them.
        log.info(
            CONNECTION_END,
            log_event="connection_end",
            how=", relayed from the client's address" if end.transparent else "",
            rule=end.rule,
            outcome=end.outcome,
            sniff_time=end.sniff_time,
            bytes_in=end.sniffed_in,
            bytes_out=end.sniffed_out,
            relayed_in=end.relayed_in,
            relayed_out=end.relayed_out,
            transparent=end.transparent,
            peer=end.peer,
            local_port=end.local_port,
            duration=end.duration,
        )

    def limit_rejected(self, limit: str) -> None:
        pass


@implementer(IConnectionObserver)
class Observers:
    """Tells each of ``observers``, in order, of every end and refusal."""

    def __init__(self, *observers: IConnectionObserver) -> None:
        self.observers = observers

    def connection_end(self, end: ConnectionEnd) -> None:
        for observer in self.observers:
            observer.connection_end(end)

    def limit_rejected(self, limit: str) -> None:
        for observer in self.observers:
            observer.limit_rejected(limit)
