"""
TLS termination: a certificate chosen by the client's SNI, ALPN negotiation,
and the decrypted stream handed to an inner factory (often another
:class:`~muxtwist.sniffing.SniffingFactory`) once the handshake is done, with
the SNI, the negotiated protocol and the client certificate in its
:class:`~muxtwist.interfaces.ConnectionInfo`.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
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
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from muxtwist import matchers
from muxtwist._limits import PerSource, host_of
from muxtwist._options import OptionError, check_terminate_tls
from muxtwist._text import LogThrottle
from muxtwist._transports import abort
from muxtwist._twisted import default_reactor
from muxtwist.interfaces import ConnectionInfo, IConnectionInfoFactory, IMatcher

if TYPE_CHECKING:
    from muxtwist.metrics import Metrics

__all__ = ["DEFAULT", "CertificateError", "TerminateTLS", "offered_protocols", "reload_all_certificates"]

log = Logger()

#: The name, in a certificate directory or mapping, of the certificate for
#: clients that send no SNI or a name nothing else covers.
DEFAULT = "DEFAULT"

_VERSIONS = {
    "TLSv1": SSL.TLS1_VERSION,
    "TLSv1.1": SSL.TLS1_1_VERSION,
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}

#: Every live TerminateTLS, so that a SIGHUP can reload all their certificates.
_instances: weakref.WeakSet[TerminateTLS] = weakref.WeakSet()


class CertificateError(ValueError):
    """A certificate file that cannot be used, and why."""


def reload_all_certificates() -> None:
    """Re-read the certificates of every :class:`TerminateTLS` in the process."""
    for terminator in list(_instances):
        terminator.reload_certificates()


def _host_key(name: str) -> str:
    """The lookup key of a certificate name: ``_.example.com`` stands for ``*.example.com``."""
    if name == DEFAULT:
        return DEFAULT
    name = name.lower().rstrip(".")
    if name.startswith("_."):
        name = "*" + name[1:]
    return name


def _sources(certificates: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Host key -> (certificate path, key path), from a directory or a mapping."""
    found: dict[str, tuple[str, str]] = {}
    if isinstance(certificates, Mapping):
        for host, paths in certificates.items():
            if isinstance(paths, (str, os.PathLike)):
                cert_path = key_path = os.fspath(paths)
            else:
                cert_path, key_path = (os.fspath(p) for p in paths)
            found[_host_key(host)] = (cert_path, key_path)
        return found
    directory = os.fspath(certificates)
    try:
        entries = sorted(os.listdir(directory))
    except OSError as e:
        raise CertificateError(f"cannot read the certificate directory {directory}: {e.strerror}") from None
    for entry in entries:
        if entry.endswith(".pem") and not entry.startswith("."):
            path = os.path.join(directory, entry)
            found[_host_key(entry[: -len(".pem")])] = (path, path)
    return found


_PRIVATE_KEY = re.compile(rb"-----BEGIN ([A-Z ]*PRIVATE KEY)-----.+?-----END \1-----", re.DOTALL)


def _read_pair(cert_path: str, key_path: str) -> tuple[list[x509.Certificate], Any]:
    try:
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        key_pem = cert_pem
        if key_path != cert_path:
            with open(key_path, "rb") as f:
                key_pem = f.read()
    except OSError as e:
        raise CertificateError(f"cannot read {e.filename}: {e.strerror}") from None
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise CertificateError(f"{cert_path}: no PEM certificate in it") from None
    block = _PRIVATE_KEY.search(key_pem)
    if block is None:
        raise CertificateError(f"{key_path}: no PEM private key in it")
    try:
        key = serialization.load_pem_private_key(block.group(0), password=None)
    except (ValueError, TypeError) as e:
        raise CertificateError(f"{key_path}: unreadable private key ({e})") from None
    return chain, key


def offered_protocols(factory: IProtocolFactory) -> list[str]:
    """
    The ALPN protocols to offer for connections handed to ``factory``: the
    protocols that ``ALPN`` matchers of its rules ask for, ``h2`` when an
    HTTP/2-capable factory is reachable (a ``twisted.web`` ``Site`` with
    HTTP/2 support installed, or a rule whose matcher is an HTTP/2 or gRPC
    one), then ``http/1.1``.
    """
    wanted: list[str] = []
    h2 = _h2_capable(factory, wanted, depth=0)
    protocols = [p for p in wanted if p not in ("h2", "http/1.1")]
    if h2 or "h2" in wanted:
        protocols.insert(0, "h2")
    protocols.append("http/1.1")
    return protocols


def _site_speaks_h2(factory: object) -> bool:
    try:
        from twisted.web.http import H2_ENABLED
        from twisted.web.server import Site
    except ImportError:  # pragma: no cover - twisted.web is part of Twisted
        return False
    return bool(H2_ENABLED) and isinstance(factory, Site)


def _matchers(matcher: IMatcher) -> Iterator[IMatcher]:
    yield matcher
    for inner in getattr(matcher, "matchers", ()):
        yield from _matchers(inner)


def _h2_matcher(matcher: IMatcher) -> bool:
    """Whether ``matcher`` recognises HTTP/2 (by its type, never by its ``name`` label)."""
    return isinstance(matcher, (matchers.HTTP2, matchers.HTTP2Header, matchers.GRPC))


def _alpn_protocols(matcher: IMatcher) -> tuple[str, ...]:
    return matcher.protocols if isinstance(matcher, matchers.ALPN) else ()


def _h2_capable(factory: object, wanted: list[str], depth: int) -> bool:
    if depth > 8:
        return False
    if _site_speaks_h2(factory):
        return True
    inner = getattr(factory, "wrappedFactory", None)
    if inner is not None and _h2_capable(inner, wanted, depth + 1):
        return True
    capable = False
    for rule in getattr(factory, "rules", ()):
        for m in _matchers(rule.matcher):
            if _h2_matcher(m):
                capable = True
            for p in _alpn_protocols(m):
                if p not in wanted:
                    wanted.append(p)
        # A Site behind a rule that only matches HTTP/1 requests cannot be
        # reached by a client that negotiated h2, so it does not count.
        if _h2_capable(rule.factory, wanted, depth + 1) and not _http1_only(rule.matcher):
            capable = True
    return capable


def _http1_only(matcher: IMatcher) -> bool:
    found = list(_matchers(matcher))
    return any(isinstance(m, matchers.HTTP1) for m in found) and not any(
        _h2_matcher(m) or isinstance(m, (matchers.ALPN, matchers.Any, matchers.SNI)) for m in found
    )


class _Certificates:
    """One loaded set of certificates: a TLS context per host name."""

    def __init__(
        self,
        contexts: dict[str, SSL.Context],
        sources: dict[str, tuple[str, str]],
        ok: bool,
        first: SSL.Context | None,
    ) -> None:
        self.contexts = contexts
        self.sources = sources
        self.ok = ok
        #: the context a connection starts with (``None``: the bare one, which chooses by SNI).
        self.first = first

    def lookup(self, server_name: str | None) -> SSL.Context | None:
        contexts = self.contexts
        if server_name:
            name = server_name.lower().rstrip(".")
            found = contexts.get(name)
            if found is not None:
                return found
            _, dot, parent = name.partition(".")
            if dot:
                found = contexts.get("*." + parent)
                if found is not None:
                    return found
        return contexts.get(DEFAULT)


@implementer(IConnectionInfoFactory)
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
        refusals (the process-wide one by default).
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
            raise ValueError(f"min_version must be one of {', '.join(_VERSIONS)}, got {min_version!r}")
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
                raise ValueError(f"{what} must be a positive integer or None, got {value!r}")
        self.max_handshakes = max_handshakes
        self.max_handshakes_per_source = max_handshakes_per_source
        if metrics is None:
            from muxtwist.metrics import default_metrics

            metrics = default_metrics()
        self.metrics = metrics
        #: handshakes in progress, overall and by client host.
        self.handshaking = 0
        self._per_source = PerSource()
        self._refusals = LogThrottle(reactor)
        self.stats: dict[str, int] = {"handshakes": 0, "failed": 0, "timed_out": 0, "refused": 0}
        self._creator = _ConnectionCreator(self)
        self._tls_factory = TLSMemoryBIOFactory(self._creator, False, factory, clock=self._reactor)
        #: contexts that call back into Python to choose a certificate by SNI.
        self._choosing: weakref.WeakSet[SSL.Context] = weakref.WeakSet()
        self._bare = self._new_context(choose=True)
        self._certificates = self._load(previous=None)
        _instances.add(self)

    def __repr__(self) -> str:
        return f"TerminateTLS({self.source!r}, {self.factory!r}, alpn={list(self.alpn)!r})"

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
        try:
            loaded = self._load(previous=self._certificates)
        except CertificateError as e:
            log.error("cannot reload certificates from {source}: {problem}", source=self.source, problem=str(e))
            return False
        self._certificates = loaded
        log.info("reloaded certificates from {source}: {hosts}", source=self.source, hosts=", ".join(self.hosts))
        return loaded.ok

    def _load(self, previous: _Certificates | None) -> _Certificates:
        sources = _sources(self.source)
        if not sources:
            # Every handshake would fail; say so now rather than once per client.
            where = (
                "no certificate in the mapping (it is empty)"
                if isinstance(self.source, Mapping)
                else f"no certificate in {os.fspath(self.source)} (it holds no *.pem file)"
            )
            raise CertificateError(f"{where}: TerminateTLS needs at least one certificate")
        # With one certificate for every name, OpenSSL need not call back
        # into Python on each handshake to choose it.
        choose = set(sources) != {DEFAULT}
        contexts: dict[str, SSL.Context] = {}
        ok = True
        for host, (cert_path, key_path) in sources.items():
            try:
                contexts[host] = self._context_with(cert_path, key_path, choose)
            except CertificateError as e:
                if previous is None:
                    raise
                ok = False
                old = previous.contexts.get(host)
                if old is not None:
                    contexts[host] = old
                    log.error("keeping the old certificate for {host}: {problem}", host=host, problem=str(e))
                else:
                    log.error("no certificate for {host}: {problem}", host=host, problem=str(e))
        if previous is not None:
            for host in sorted(set(previous.contexts) - set(contexts)):
                log.info("certificate for {host} removed", host=host)
        first = contexts.get(DEFAULT)
        if first is not None and choose and first not in self._choosing:
            # A kept DEFAULT from a single-certificate set cannot choose by
            # SNI (a used context cannot change): start from the bare one.
            first = None
        return _Certificates(contexts, sources, ok, first)

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
        chain, key = _read_pair(cert_path, key_path)
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
        self.factory.doStop()

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        return self.buildProtocolForConnection(addr, ConnectionInfo(peer=addr), "")

    def buildProtocolForConnection(self, addr: IAddress, info: ConnectionInfo, rule_name: str) -> IProtocol | None:
        source = host_of(info.source if info.source is not None else addr)
        limit, per_source = None, self.max_handshakes_per_source
        if self.max_handshakes is not None and self.handshaking >= self.max_handshakes:
            limit, value = "max_handshakes", self.max_handshakes
        elif per_source is not None and not self._per_source.take(source, per_source):
            limit, value = "max_handshakes_per_source", per_source
        if limit is not None:
            self.stats["refused"] += 1
            self.metrics.limit_rejected(limit)
            self._refused(info.source or addr, limit, value)
            return None
        self.handshaking += 1
        handshake = _Handshake(self, addr, info, rule_name, source)
        tls: TLSMemoryBIOProtocol = self._tls_factory.protocol(self._tls_factory, handshake)
        return tls

    def _handshake_over(self, source: str | None) -> None:
        self.handshaking -= 1
        if source is not None:
            self._per_source.release(source)

    def _refused(self, peer: object, limit: str, value: int) -> None:
        """
        One warning per limit per second at most: a connect loop against a
        full limit must not turn into a log line per connection. The lines
        left out are counted in the next one.
        """
        suppressed = self._refusals.admit(limit)
        if suppressed is not None:
            log.warn(
                "refusing {peer}: {limit} ({value}) reached; {suppressed} more refused since the last such line",
                peer=str(peer),
                limit=limit,
                value=value,
                suppressed=suppressed,
            )


@implementer(IOpenSSLServerConnectionCreator)
class _ConnectionCreator:
    """Makes each connection's ``SSL.Connection`` and answers OpenSSL's callbacks."""

    def __init__(self, owner: TerminateTLS) -> None:
        # A weak reference: the contexts hold our callbacks, and the owner
        # holds the contexts.
        self._owner = weakref.ref(owner)

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        owner = self._owner()
        assert owner is not None
        ctx = owner._certificates.first or owner._bare
        connection = SSL.Connection(ctx, None)
        handshake = tlsProtocol.wrappedProtocol
        if isinstance(handshake, _Handshake):
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
class _Handshake:
    """
    Stands in for the application protocol until the handshake completes,
    then builds it and puts it in its own place as the TLS layer's
    ``wrappedProtocol``, so the decrypted stream costs nothing extra per byte.
    """

    def __init__(
        self, owner: TerminateTLS, addr: IAddress, info: ConnectionInfo, rule_name: str, source: str | None = None
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
            peer=self.info.source or self.addr,
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
                peer=self.info.source or self.addr,
                reason=_describe(reason),
            )


def _describe(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        return "; ".join(str(e[-1]) for e in value.args[0] if isinstance(e, (tuple, list)) and e) or str(value)
    return str(value)
