"""
The PROXY protocol pre-stage of a sniffed connection: a peer trusted by
``accept_proxy_protocol`` sends a PROXY v1/v2 header before its data; the
header is read (:class:`muxtwist.proxyprotocol.ProxyHeaderReader`) before
any rule sees a byte, and the connection is then known by the header's
source. A missing or broken header from a trusted peer closes the
connection, saying why.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IAddress, ITransport
from twisted.logger import Logger

from muxtwist._limits import host_of
from muxtwist._rules import Outcome
from muxtwist.interfaces import ConnectionInfo
from muxtwist.proxyprotocol import ProxyHeaderReader, Trust

__all__ = ["PreStageOwner", "ProxyPreStage"]

log = Logger(namespace="muxtwist.sniffing")


class PreStageOwner(Protocol):
    """What the pre-stage reads of the sniffing factory."""

    max_sniff_bytes: int
    max_connections_per_source: int | None

    def _take_source(self, source: str | None) -> bool: ...

    def _refused(self, peer: object, limit: str, value: int, rule: str = "") -> None: ...

    def _refused_header(self, peer: object, problem: str) -> None: ...


class ProxyPreStage:
    """
    The PROXY pre-stage, as a part of :class:`muxtwist.sniffing.SniffingProtocol`
    (which holds the state: the reader, the buffer, the connection's info).
    """

    # The state the pre-stage writes; the rest of the connection's state is the sniffer's.
    __slots__ = ("_info", "_overflow", "_proxy_reader", "_source")

    addr: IAddress
    factory: PreStageOwner
    transport: ITransport | None
    _buffer: bytearray | None
    _info: ConnectionInfo | None
    _overflow: bytes
    _proxy_reader: ProxyHeaderReader | None
    _source: str | None

    def _end_sniffing(self, outcome: Outcome, rule_name: str) -> None:
        raise NotImplementedError

    def _evaluate(self, final: Outcome | None, data: bytes | None = None) -> None:
        raise NotImplementedError

    def _start_proxy_stage(self, info: ConnectionInfo, trusted: Trust) -> None:
        """Read a PROXY header before sniffing."""
        self._proxy_reader = ProxyHeaderReader(info, trusted)

    def _refuse(self, problem: str) -> None:
        """Close a connection whose PROXY pre-stage failed, saying why."""
        self.factory._refused_header(self.addr, problem)
        self._end_sniffing(Outcome.REJECTED, "proxy_protocol")
        assert self.transport is not None
        self.transport.loseConnection()

    def _read_proxy_header(self, data: bytes) -> bytes:
        reader = self._proxy_reader
        assert reader is not None
        try:
            rest = reader.feed(data)
        except ValueError as e:
            self._refuse(str(e))
            return b""
        if rest is None:
            return b""
        self._info = reader.info
        self._proxy_reader = None
        factory = self.factory
        limit = factory.max_connections_per_source
        if reader.trusted and limit is not None and self._source is None:
            # The balancer was not counted: count the client it speaks for.
            source = host_of(self._info.source)
            if not factory._take_source(source):
                factory._refused(self._info.source, "max_connections_per_source", limit)
                self._end_sniffing(Outcome.REJECTED, "")
                assert self.transport is not None
                self.transport.loseConnection()
                return b""
            self._source = source
        if not rest:
            # Rules that decide on zero bytes (RemoteAddress) decide now; with
            # bytes after the header, dataReceived evaluates them with it.
            self._evaluate(final=None)
        return rest

    def _finish_proxy_stage(self, why: str) -> bool:
        """
        The client stopped (``why``) while the PROXY reader was undecided:
        take what an untrusted client sent into the buffer, to be sniffed,
        or refuse a trusted peer's missing or cut-short header. Whether
        sniffing goes on.
        """
        reader, self._proxy_reader = self._proxy_reader, None
        if reader is None:
            return True
        try:
            held = reader.finish()
        except ValueError as e:
            self._refuse(f"{e} ({why})")
            return False
        buffer = self._buffer
        assert buffer is not None
        room = self.factory.max_sniff_bytes - len(buffer)
        buffer += held[:room]
        self._overflow = held[room:]
        return True
