"""
Reporting the end of connections: the ``connection_end`` log as an
:class:`~muxtwist.interfaces.IConnectionObserver`, and a fan-out that tells
several observers (metrics and the log) the same thing.

The sniffer builds one :class:`ConnectionEnd` per connection and hands it to
its observer; neither the sniffer nor the relays know who listens.
"""

from __future__ import annotations

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from muxtwist.interfaces import ConnectionEnd, IConnectionObserver

__all__ = ["ConnectionLog", "Observers"]

# The sniffer's namespace: filters and log pipelines select connection_end by it.
log = Logger(namespace="muxtwist.sniffing")

#: The fields of :class:`ConnectionEnd`, each a field of the ``connection_end`` event.
_FIELDS = tuple(field.name for field in attrs.fields(ConnectionEnd))

#: The ``log_format`` of the ``connection_end`` event; its fields are those of :class:`ConnectionEnd`.
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
        # Read field by field: attrs.asdict costs twice as much, per connection.
        fields = {name: getattr(end, name) for name in _FIELDS}
        # The event's field names predate ConnectionEnd; log pipelines read them.
        fields["bytes_in"] = fields.pop("sniffed_in")
        fields["bytes_out"] = fields.pop("sniffed_out")
        how = ", relayed from the client's address" if end.transparent else ""
        log.info(CONNECTION_END, log_event="connection_end", how=how, **fields)

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
