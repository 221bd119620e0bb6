"""
One TLS connection of a :class:`~muxtwist.tls.TerminateTLS` until its
handshake is done: the ``SSL.Connection`` made for it, the certificate
chosen by SNI and the ALPN protocol (OpenSSL's callbacks), the handshake
timeout, then the inner factory's protocol put in the TLS layer's place,
with the SNI, ALPN and client certificate in its ``ConnectionInfo``.
"""

from __future__ import annotations

import weakref
from typing import Any
from typing import Protocol as TypingProtocol

from OpenSSL import SSL
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    ITransport,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from muxtwist._failures import failure_text
from muxtwist._limits import address_text
from muxtwist._transports import abort
from muxtwist.interfaces import ConnectionInfo, IConnectionInfoFactory
from muxtwist.tls._certificates import Certificates

__all__ = ["ConnectionCreator", "Handshake"]

log = Logger(namespace="muxtwist.tls")


class _Owner(TypingProtocol):
    """What the handshake side reads and calls on its :class:`~muxtwist.tls.TerminateTLS`."""

    _reactor: IReactorTime
    _certificates: Certificates
    _bare: SSL.Context
    _alpn_wire: list[bytes]
    factory: IProtocolFactory
    client_ca: str | None
    handshake_timeout: float
    stats: dict[str, int]

    def context_for(self, server_name: str | None) -> SSL.Context | None: ...

    def _handshake_over(self, source: str | None) -> None: ...


@implementer(IOpenSSLServerConnectionCreator)
class ConnectionCreator:
    """Makes each connection's ``SSL.Connection`` and answers OpenSSL's callbacks."""

    def __init__(self, owner: _Owner) -> None:
        # A weak reference: the contexts hold our callbacks, and the owner
        # holds the contexts.
        self._owner = weakref.ref(owner)

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        owner = self._owner()
        assert owner is not None
        ctx = owner._certificates.first or owner._bare
        connection = SSL.Connection(ctx, None)
        handshake = tlsProtocol.wrappedProtocol
        if isinstance(handshake, Handshake):
            handshake.tls_connection = connection
        return connection

    def servername(self, connection: SSL.Connection) -> None:
        owner = self._owner()
        if owner is None:
            return
        raw = connection.get_servername()
        name = raw.decode("ascii", "replace") if raw else None
        ctx = owner.context_for(name)
        if ctx is None:
            # No certificate: OpenSSL fails the handshake with an alert.
            log.info("no certificate for server name {sni!r} and no DEFAULT", sni=name)
            ctx = owner._bare
        if ctx is not connection.get_context():
            connection.set_context(ctx)

    def select_alpn(self, connection: SSL.Connection, offered: list[bytes]) -> Any:
        owner = self._owner()
        if owner is not None:
            for p in owner._alpn_wire:
                if p in offered:
                    return p
        return SSL.NO_OVERLAPPING_PROTOCOLS


@implementer(IProtocol, IHandshakeListener)
class Handshake:
    """
    Stands in for the application protocol until the handshake completes,
    then builds it and puts it in its own place as the TLS layer's
    ``wrappedProtocol``, so the decrypted stream costs nothing extra per byte.
    """

    def __init__(
        self, owner: _Owner, addr: IAddress, info: ConnectionInfo, rule_name: str, source: str | None = None
    ) -> None:
        self.owner = owner
        self.source = source
        self._counted = True
        self.addr = addr
        self.info = info
        self.rule_name = rule_name
        self.tls_connection: SSL.Connection | None = None
        self.transport: ITransport | None = None
        self._buffer: list[bytes] = []
        self._timeout: IDelayedCall | None = None
        self._done = False

    def makeConnection(self, transport: ITransport) -> None:
        self.transport = transport
        self.connectionMade()

    def connectionMade(self) -> None:
        self._timeout = self.owner._reactor.callLater(self.owner.handshake_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timeout = None
        self.owner.stats["timed_out"] += 1
        log.info(
            "TLS handshake with {peer} not done after {timeout}s: aborted",
            peer=address_text(self.info.source or self.addr),
            timeout=self.owner.handshake_timeout,
        )
        if self.transport is not None:
            abort(self.transport)

    def _cancel_timeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        if self._counted:
            self._counted = False
            self.owner._handshake_over(self.source)

    def handshakeCompleted(self) -> None:
        self._cancel_timeout()
        self._done = True
        owner = self.owner
        owner.stats["handshakes"] += 1
        tls = self.transport
        connection = self.tls_connection
        assert isinstance(tls, TLSMemoryBIOProtocol) and connection is not None
        raw_sni = connection.get_servername()
        raw_alpn = connection.get_alpn_proto_negotiated()
        peer_certificate = None
        if owner.client_ca is not None:
            peer_certificate = connection.get_peer_certificate(as_cryptography=True)
        info = self.info
        info = info.evolve(
            local=tls.getHost() if info.local is None else info.local,
            sni=raw_sni.decode("ascii", "replace").lower() if raw_sni else None,
            alpn=raw_alpn.decode("ascii", "replace") if raw_alpn else None,
            peer_certificate=peer_certificate,
        )
        inner_factory = owner.factory
        try:
            if IConnectionInfoFactory.providedBy(inner_factory):
                proto = inner_factory.buildProtocolForConnection(self.addr, info, self.rule_name)
            else:
                proto = inner_factory.buildProtocol(self.addr)
        except Exception:
            log.failure("the factory inside TLS termination raised in buildProtocol")
            proto = None
        if proto is None:
            tls.loseConnection()
            return
        tls.wrappedProtocol = proto
        proto.makeConnection(tls)
        buffered, self._buffer = self._buffer, []
        for chunk in buffered:
            if tls.disconnecting:
                break
            proto.dataReceived(chunk)

    def dataReceived(self, data: bytes) -> None:
        # Application data comes only after the handshake, and by then the
        # inner protocol has our place; keep anything anyway.
        self._buffer.append(data)

    def connectionLost(self, reason: Failure) -> None:
        self._cancel_timeout()
        if not self._done:
            self.owner.stats["failed"] += 1
            log.info(
                "TLS handshake with {peer} failed: {reason}",
                peer=address_text(self.info.source or self.addr),
                reason=failure_text(reason),
            )
