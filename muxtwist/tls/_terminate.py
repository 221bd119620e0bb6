"""
:class:`TerminateTLS`, the action: its options, the TLS contexts it makes
for its certificates (:mod:`~muxtwist.tls._certificates`), the limits on
handshakes in progress, and one handshake
(:mod:`~muxtwist.tls._handshake`) per connection.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory, IReactorTime
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from muxtwist._inner import tell_retiring
from muxtwist._limits import PerSource, address_text, host_of
from muxtwist._options import OptionError, check_terminate_tls, shown
from muxtwist._reachable import within
from muxtwist._report import Observers
from muxtwist._text import BurstLog
from muxtwist._twisted import default_reactor
from muxtwist.interfaces import ConnectionInfo, IConnectionInfoFactory, IRetiringFactory
from muxtwist.tls._alpn import offered_protocols
from muxtwist.tls._certificates import CertificateError, Certificates, load_certificates, read_pair
from muxtwist.tls._handshake import ConnectionCreator, Handshake

if TYPE_CHECKING:
    from muxtwist.metrics import Metrics

__all__ = ["TerminateTLS", "reload_all_certificates", "terminators"]

log = Logger(namespace="muxtwist.tls")

_VERSIONS = {
    "TLSv1": SSL.TLS1_VERSION,
    "TLSv1.1": SSL.TLS1_1_VERSION,
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}


def terminators(factories: Iterable[object]) -> list[TerminateTLS]:
    """
    Each :class:`TerminateTLS` among ``factories`` or reachable from their
    rules (through nested sniffing factories and other wrappers), once.
    """
    return [f for f in within(factories) if isinstance(f, TerminateTLS)]


def reload_all_certificates(*factories: object) -> None:
    """
    Re-read the certificates of every :class:`TerminateTLS` among
    ``factories`` or reachable from their rules, nested ones included (what
    :meth:`~muxtwist.service.MuxService.reload` does for its listeners).

    :raises TypeError: no factory given: there is no process-wide list of
        ``TerminateTLS`` to fall back on.
    """
    if not factories:
        raise TypeError("reload_all_certificates() needs the factories to look in (a SniffingFactory, a TerminateTLS)")
    for terminator in terminators(factories):
        terminator.reload_certificates()


@implementer(IConnectionInfoFactory, IRetiringFactory)
class TerminateTLS:
    """
    Terminate TLS and hand the decrypted stream to ``factory``.

    :param certificates: a directory of PEM files named by host, each holding
        the certificate chain and its private key (``example.com.pem``,
        ``_.example.com.pem`` for ``*.example.com``, ``DEFAULT.pem`` for
        clients without SNI or with a name nothing else covers), or a mapping
        of such names to ``(certificate_path, key_path)`` pairs (or to one
        path holding both).
    :param factory: any ``IProtocolFactory``; it gets the connection when the
        handshake completes. One that provides ``IConnectionInfoFactory``
        (a ``SniffingFactory``) gets a ``ConnectionInfo`` with ``sni``,
        ``alpn`` and ``peer_certificate`` set.
    :param alpn: the ALPN protocols to offer, in order of preference; by
        default derived from ``factory`` (see :func:`offered_protocols`).
        An empty sequence turns ALPN off.
    :param min_version: the oldest TLS version accepted: ``"TLSv1.2"`` or
        ``"TLSv1.3"`` (older ones only if you must).
    :param client_ca: a PEM file of CA certificates; when given, clients must
        present a certificate they signed (mutual TLS).
    :param handshake_timeout: seconds a client may take to finish the
        handshake before the connection is aborted.
    :param resumption: let clients resume sessions (a server-side session
        cache and session tickets). Off by default, as in Twisted's own TLS
        endpoints: every handshake is a full one, and no handshake pays for
        making tickets that short-lived clients never use.
    :param max_handshakes: the most handshakes in progress at once; a
        connection beyond it is closed at once, counted as a limit rejection
        (``max_handshakes``) and logged. A stalled handshake holds about
        70 KiB until ``handshake_timeout``. ``None``: no limit.
    :param max_handshakes_per_source: the same, per client host (the PROXY
        protocol source when one was accepted); limit
        ``max_handshakes_per_source``. ``None``: no limit.
    :param metrics: the :class:`~muxtwist.metrics.Metrics` that counts
        refusals; none by default (a :class:`~muxtwist.service.MuxService`
        whose rules reach it gives it its own).
    :raises CertificateError: a certificate file is missing or broken, or
        there is no certificate at all (an empty directory or mapping).
    """

    def __init__(
        self,
        certificates: str | os.PathLike[str] | Mapping[str, Any],
        factory: IProtocolFactory,
        *,
        alpn: Sequence[str] | None = None,
        min_version: str = "TLSv1.2",
        client_ca: str | os.PathLike[str] | None = None,
        handshake_timeout: float = 10.0,
        resumption: bool = False,
        max_handshakes: int | None = 1000,
        max_handshakes_per_source: int | None = 50,
        metrics: Metrics | None = None,
        reactor: IReactorTime | None = None,
    ) -> None:
        reactor = default_reactor(reactor)
        check_terminate_tls(
            certificates, alpn=alpn, client_ca=client_ca, handshake_timeout=handshake_timeout, resumption=resumption
        )
        if not IProtocolFactory.providedBy(factory):
            raise OptionError("TerminateTLS", "factory", factory, "a protocol factory (a Site, a SniffingFactory, ...)")
        if min_version not in _VERSIONS:
            raise ValueError(f"min_version must be one of {', '.join(_VERSIONS)}, got {shown(min_version)}")
        self._reactor: IReactorTime = reactor
        self.source = certificates
        self.factory = factory
        self.alpn: tuple[str, ...] = tuple(alpn) if alpn is not None else tuple(offered_protocols(factory))
        self._alpn_wire = [p.encode("ascii") for p in self.alpn]
        self.min_version = min_version
        self.client_ca = os.fspath(client_ca) if client_ca is not None else None
        self.handshake_timeout = handshake_timeout
        self.resumption = resumption
        for what, value in (
            ("max_handshakes", max_handshakes),
            ("max_handshakes_per_source", max_handshakes_per_source),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{what} must be a positive integer or None, got {shown(value)}")
        self.max_handshakes = max_handshakes
        self.max_handshakes_per_source = max_handshakes_per_source
        # Counted where the caller says: the Metrics given here, or those of
        # the MuxService whose rules reach it. Built alone, it counts nowhere.
        self.metrics: Metrics | Observers = Observers() if metrics is None else metrics
        self._handshaking = 0
        self._per_source = PerSource()
        self._refusals: BurstLog[dict[str, object]] = BurstLog(reactor, _refusals_tail)
        self.stats: dict[str, int] = {"handshakes": 0, "failed": 0, "timed_out": 0, "refused": 0}
        self._creator = ConnectionCreator(self)
        self._tls_factory = TLSMemoryBIOFactory(self._creator, False, factory, clock=self._reactor)
        #: contexts that call back into Python to choose a certificate by SNI.
        self._choosing: weakref.WeakSet[SSL.Context] = weakref.WeakSet()
        self._bare = self._new_context(choose=True)
        self._certificates = self._load(previous=None)

    def __repr__(self) -> str:
        return f"TerminateTLS({self.source!r}, {self.factory!r}, alpn={list(self.alpn)!r})"

    @property
    def handshaking(self) -> int:
        """Handshakes in progress (each counted by its client host too, for ``max_handshakes_per_source``)."""
        return self._handshaking

    # Certificates

    @property
    def hosts(self) -> list[str]:
        """The host names (and ``DEFAULT``) there is a certificate for."""
        return sorted(self._certificates.contexts)

    def context_for(self, server_name: str | None) -> SSL.Context | None:
        """The TLS context a client asking for ``server_name`` gets, or ``None`` for a refusal."""
        return self._certificates.lookup(server_name)

    def reload_certificates(self) -> bool:
        """
        Read the certificates again: new connections get the new ones, live
        connections keep theirs. A file that is broken now keeps the
        certificate it held before (and is logged). Returns whether every
        file loaded.
        """
        previous = self._certificates
        try:
            loaded = self._load(previous=previous)
        except CertificateError as e:
            log.error("cannot reload certificates from {source}: {problem}", source=self.source, problem=str(e))
            return False
        self._certificates = loaded
        if loaded.ok:
            log.info("reloaded certificates from {source}: {hosts}", source=self.source, hosts=", ".join(self.hosts))
            return True
        # Each broken file was logged (with its host and problem); say what the reload as a whole did.
        kept = sorted(h for h, ctx in loaded.contexts.items() if previous.contexts.get(h) is ctx)
        missing = sorted(set(loaded.sources) - set(loaded.contexts))
        reloaded = sorted(set(loaded.contexts) - set(kept))
        log.warn(
            "certificates from {source} not all reloaded"
            + (": the old certificate is kept for {kept}" if kept else "")
            + ("; no certificate for {missing}" if missing else "")
            + ("; reloaded: {reloaded}" if reloaded else "; none reloaded"),
            source=self.source,
            kept=", ".join(kept),
            missing=", ".join(missing),
            reloaded=", ".join(reloaded),
        )
        return False

    def _load(self, previous: Certificates | None) -> Certificates:
        return load_certificates(self.source, previous, self._context_with, self._choosing)

    def _new_context(self, choose: bool) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(_VERSIONS[self.min_version])
        options = SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
        if not self.resumption:
            options |= SSL.OP_NO_TICKET
            ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_options(options)
        # Session resumption with client certificates needs a context id.
        ctx.set_session_id(b"muxtwist")
        if self.client_ca is not None:
            ca = os.fsencode(self.client_ca)
            ctx.load_verify_locations(ca)
            ctx.load_client_ca(ca)
            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, None)
        if choose:
            ctx.set_tlsext_servername_callback(self._creator.servername)
            self._choosing.add(ctx)
        if self._alpn_wire:
            ctx.set_alpn_select_callback(self._creator.select_alpn)
        return ctx

    def _context_with(self, cert_path: str, key_path: str, choose: bool) -> SSL.Context:
        chain, key = read_pair(cert_path, key_path)
        ctx = self._new_context(choose)
        try:
            ctx.use_certificate(chain[0])
            for extra in chain[1:]:
                ctx.add_extra_chain_cert(extra)
            ctx.use_privatekey(key)
            ctx.check_privatekey()
        except (SSL.Error, TypeError, ValueError) as e:
            raise CertificateError(f"{cert_path}: certificate and key do not go together ({e})") from None
        return ctx

    # IProtocolFactory

    def doStart(self) -> None:
        self.factory.doStart()

    def doStop(self) -> None:
        self._refusals.flush()
        self.factory.doStop()

    def retiring(self) -> None:
        """
        The rules no longer name this TerminateTLS: the factory behind it is
        told too, if it wants to know (a WSGI or ASGI target closes its idle
        keep-alive connections; should other rules still name that target,
        those clients only open new connections). Whatever it raises is
        logged and ignored, as the sniffer does for the factories it tells.
        """
        tell_retiring(self.factory)

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        return self.buildProtocolForConnection(addr, ConnectionInfo(peer=addr), "")

    def buildProtocolForConnection(self, addr: IAddress, info: ConnectionInfo, rule_name: str) -> IProtocol | None:
        source = host_of(info.source if info.source is not None else addr)
        limit, per_source = None, self.max_handshakes_per_source
        if self.max_handshakes is not None and self._handshaking >= self.max_handshakes:
            limit, value = "max_handshakes", self.max_handshakes
        elif per_source is not None and not self._per_source.take(source, per_source):
            limit, value = "max_handshakes_per_source", per_source
        if limit is not None:
            self.stats["refused"] += 1
            self.metrics.limit_rejected(limit)
            self._refused(info.source or addr, limit, value)
            return None
        self._handshaking += 1
        handshake = Handshake(self, addr, info, rule_name, source)
        tls: TLSMemoryBIOProtocol = self._tls_factory.protocol(self._tls_factory, handshake)
        return tls

    def _handshake_over(self, source: str | None) -> None:
        self._handshaking -= 1
        if source is not None:
            self._per_source.release(source)

    def _refused(self, peer: object, limit: str, value: int) -> None:
        """
        One warning per limit per second at most: a connect loop against a
        full limit must not turn into a log line per connection. The lines
        left out are counted in the next one, or in a line of their own
        within a second of the last (at once when the terminator stops).
        """
        fields: dict[str, object] = {"peer": address_text(peer), "limit": limit, "value": value}
        suppressed = self._refusals.admit(limit, fields)
        if suppressed is not None:
            log.warn(
                "refusing {peer}: {limit} ({value}) reached; {suppressed} more refused since the last such line",
                suppressed=suppressed,
                **fields,
            )


def _refusals_tail(fields: dict[str, object], suppressed: int) -> None:
    log.warn(
        "refused {suppressed} more handshakes since the last such line: {limit} ({value}) reached (the last: {peer})",
        suppressed=suppressed,
        **fields,
    )
