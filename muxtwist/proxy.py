"""
The proxy action: relay a sniffed connection to one of several backends.

Reading from the client is paused until a backend has connected; the sniffed
bytes go first (after a PROXY header, if asked for); then both directions
flow with each transport registered as the other's streaming producer, so a
slow reader on either side stops reading on the other and memory stays
bounded. After the backend connects, each chunk costs one ``write`` call: the
protocols' ``dataReceived`` *is* the other transport's ``write``.

On Linux, when both ends are plain TCP connections, the relay instead takes
both sockets off Twisted's read/write path once the sniffed bytes are handed
over (see :mod:`muxtwist._splice`): small exchanges are one ``recv`` and one
``send``, and a direction carrying bulk moves kernel-side with ``splice(2)``
through a pipe, never copied into Python. ``splice=False`` keeps the
portable Twisted relay.

Half-close is passed on both ways between plain TCP and UNIX streams. TLS
has no half-close Twisted can send, so towards a TLS end (``TerminateTLS``,
a TLS listener, ``tls=`` backends) none is passed on: the other side's end
of stream is kept until the TLS end closes (a client that half-closes still
gets the rest of a TLS backend's answer), and a backend that closes first
closes a TLS client with a ``close_notify`` once everything is written.
An abort on one side aborts the other, and every ending cancels its timers
and closes both sockets.
"""

from __future__ import annotations

import ipaddress
import random
import re
import zlib
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet import defer, error
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    ISSLTransport,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from muxtwist import _splice
from muxtwist._connect import direct_endpoint
from muxtwist._options import check_proxy
from muxtwist.interfaces import ConnectionInfo, IConnectionInfoFactory, IConnectionReport
from muxtwist.matchers.proxy_protocol import build_v1, build_v2
from muxtwist.proxyprotocol import header_for, ip_port
from muxtwist.transparent import TransparentEndpoint, TransparentUnavailable, unavailable_reason

__all__ = ["BALANCE", "Backend", "BackendStats", "HealthCheck", "Proxy"]

log = Logger()

BALANCE = ("round_robin", "least_conn", "random", "first", "source_hash")


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"HealthCheck {attribute.name} must be positive, got {value!r}")


@attrs.frozen
class HealthCheck:
    """
    An active health check, run against every backend of a :class:`Proxy`.

    Every ``interval`` seconds a connection is opened to the backend; it
    passes when it connects within ``timeout`` seconds (to a TLS backend:
    completes the handshake and verifies the certificate, so a backend with
    a bad certificate is down) and, if ``send`` is given, that is written,
    and, if ``expect`` is given, those bytes arrive within the timeout. ``rise`` passes in a row mark a backend healthy,
    ``fall`` failures in a row mark it down.
    """

    interval: float = attrs.field(default=5.0, validator=_positive)
    timeout: float = attrs.field(default=2.0, validator=_positive)
    rise: int = attrs.field(default=2, validator=_positive)
    fall: int = attrs.field(default=3, validator=_positive)
    send: bytes | None = None
    expect: bytes | None = None


@attrs.define
class BackendStats:
    """
    Counters of one backend, for logs and metrics.

    :ivar active: relays open to it now.
    :ivar total: relays ever opened to it.
    :ivar transparent: of those, relays opened from the client's own address.
    :ivar failures: connect failures and mid-stream resets.
    :ivar healthy: what the active health check says (``True`` without one).
    :ivar errors: ``failures`` by kind: refused, timeout, reset, tls, error.
    :ivar bytes_in: bytes relayed from clients to it, by relays that have ended.
    :ivar bytes_out: bytes relayed from it to clients, by relays that have ended.
    :ivar last_check: the last active check's result: ``"passed"`` or why it failed.
    :ivar last_check_at: when it ran (reactor seconds).
    :ivar since: when ``healthy`` took its current value (reactor seconds;
        ``None`` before the first check).
    """

    active: int = 0
    total: int = 0
    transparent: int = 0
    failures: int = 0
    healthy: bool = True
    errors: dict[str, int] = attrs.Factory(dict)
    bytes_in: int = 0
    bytes_out: int = 0
    last_check: str | None = None
    last_check_at: float | None = None
    since: float | None = None


_HOST = re.compile(r"(?:^|:)host=((?:\\.|[^:\\])+)")


def _host_of(description: str) -> str | None:
    found = _HOST.search(description)
    return None if found is None else re.sub(r"\\(.)", r"\1", found.group(1))


class Backend:
    """One backend of a :class:`Proxy`: its endpoint, counters and health state."""

    def __init__(self, description: str, endpoint: IStreamClientEndpoint, tls: bool) -> None:
        self.description = description
        self.endpoint = endpoint
        self.tls = tls
        self.stats = BackendStats()
        #: connect failures in a row (passive health).
        self.failures_in_row = 0
        #: until when passive health skips this backend (reactor seconds).
        self.down_until = 0.0
        self._checks_passed = 0
        self._checks_failed = 0
        self._check_call: IDelayedCall | None = None
        self._probe: _Probe | None = None

    def __repr__(self) -> str:
        return f"<Backend {self.description}>"

    def usable(self, now: float) -> bool:
        """Whether neither health check is keeping connections away from it."""
        return self.stats.healthy and self.down_until <= now


def _transparent_addresses(descriptions: Sequence[str]) -> dict[str, tuple[str, int]]:
    """The IP address and port of each ``tcp:`` backend, or a clear error why transparent=True cannot work."""
    reason = unavailable_reason()
    if reason is not None:
        raise TransparentUnavailable(reason)
    addresses = {}
    for d in descriptions:
        host, port = _host_of(d), re.search(r"(?:^|:)port=(\d+)(?::|$)", d)
        if not d.startswith(("tcp:", "tcp6:")) or host is None or port is None:
            raise ValueError(f"transparent=True needs tcp:host=ADDRESS:port=N backends, got {d!r}")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"transparent=True needs the backend's IP address, not a name: {d!r}") from None
        addresses[d] = (host, int(port.group(1)))
    return addresses


def _tls_creator(tls: object, description: str) -> IOpenSSLClientConnectionCreator:
    from twisted.internet.ssl import optionsForClientTLS

    if tls is True:
        host = _host_of(description)
        if host is None:
            raise ValueError(f"tls=True needs a host= in the backend description {description!r}; give tls='hostname'")
        return optionsForClientTLS(host)
    if isinstance(tls, str):
        return optionsForClientTLS(tls)
    if IOpenSSLClientConnectionCreator.providedBy(tls):
        return tls
    raise TypeError(f"tls must be True, a hostname or a client TLS options object, got {tls!r}")


def _kind(reason: Failure) -> str:
    if reason.check(error.ConnectionRefusedError):
        return "refused"
    if reason.check(error.TimeoutError, error.ConnectingCancelledError, defer.CancelledError):
        return "timeout"
    if reason.check(error.ConnectionDone):
        return "closed"
    from OpenSSL import SSL
    from service_identity import VerificationError

    if reason.check(SSL.Error, VerificationError):
        return "tls"
    return "error"


def _describe(reason: Failure) -> str:
    from OpenSSL import SSL
    from service_identity import VerificationError

    if reason.check(VerificationError):
        return f"TLS certificate does not match the backend's name ({reason.value})"
    if reason.check(SSL.Error):
        text = str(reason.value)
        if "certificate verify failed" in text:
            return f"TLS certificate verification failed ({text})"
        return f"TLS handshake failed ({text})"
    return reason.getErrorMessage()


@implementer(IConnectionInfoFactory)
class Proxy:
    """
    Relay each connection to a backend.

    :param backends: a client endpoint description (``"tcp:host=127.0.0.1:port=6379"``,
        ``"unix:path=/run/app.sock"``), or a list of them.
    :param balance: how the backend is chosen: ``round_robin``, ``least_conn``
        (fewest open relays), ``random``, ``first`` (the first usable one, in
        order: failover) or ``source_hash`` (the same client host always gets
        the same backend while the set of usable backends stays the same).
    :param proxy_protocol: ``1`` or ``2`` to send the backend a PROXY header
        first: source the client, destination our listening address, or
        both as an accepted (trusted) incoming PROXY header gave them.
    :param connect_timeout: seconds for a backend to connect (and finish its
        TLS handshake) before the next one is tried.
    :param idle_timeout: close relays that move no byte either way for this long.
    :param close_timeout: seconds an end the relay has closed may linger
        without taking a byte before it is aborted: a TLS peer that never
        answers our ``close_notify``, or a reader that stopped reading, would
        otherwise hold its socket for ever.
    :param tls: ``True`` (verify the certificate against the ``host=`` of the
        description), a hostname to verify, or a client TLS options object
        (``optionsForClientTLS(...)``) for TLS to the backends.
    :param max_connections: relays open at once beyond which new connections are closed.
    :param health_check: a :class:`HealthCheck` to run against every backend.
    :param max_fails: connect failures in a row after which a backend is
        skipped (passive health) ...
    :param fail_timeout: ... for this many seconds.
    :param splice: relay with ``splice(2)`` where the platform and both
        connections allow it (Linux, plain TCP on both sides); ``False``
        always uses the portable Twisted relay. Pipes are capped across the
        process: see :meth:`set_max_pipes`.
    :param transparent: connect to the backends from the client's own
        address and port (the PROXY source, when a header was accepted),
        with Linux's ``IP_TRANSPARENT``, so backends that cannot read the
        PROXY protocol log the real client. Needs ``CAP_NET_ADMIN`` (checked
        here: without it, construction fails with one line saying how to fix
        it), ``tcp:`` backends given by IP address, and the host routing that
        ``python -m muxtwist doctor`` checks. A client that has no IP address
        (a UNIX-socket listener) is relayed from the host's own address.
    :param reactor: the reactor to connect and to time with.

    :ivar stats: the :class:`BackendStats` of each backend, by description.
    :ivar relays: the relays open now.
    """

    def __init__(
        self,
        backends: str | Sequence[str],
        *,
        balance: str = "round_robin",
        proxy_protocol: int | None = None,
        connect_timeout: float = 5.0,
        idle_timeout: float | None = None,
        close_timeout: float = 10.0,
        tls: object = None,
        max_connections: int | None = None,
        health_check: HealthCheck | None = None,
        max_fails: int = 3,
        fail_timeout: float = 10.0,
        splice: bool = True,
        transparent: bool = False,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        check_proxy(
            backends,
            connect_timeout=connect_timeout,
            idle_timeout=idle_timeout,
            max_connections=max_connections,
            max_fails=max_fails,
            fail_timeout=fail_timeout,
            splice=splice,
            tls=tls,
        )
        descriptions = [backends] if isinstance(backends, str) else list(backends)
        if not descriptions or not all(isinstance(d, str) for d in descriptions):
            raise ValueError(f"Proxy needs one or more endpoint description strings, got {backends!r}")
        if balance not in BALANCE:
            raise ValueError(f"balance must be one of {', '.join(BALANCE)}; got {balance!r}")
        if proxy_protocol not in (None, 1, 2):
            raise ValueError(f"proxy_protocol must be None, 1 or 2, got {proxy_protocol!r}")
        if connect_timeout <= 0 or (idle_timeout is not None and idle_timeout <= 0):
            raise ValueError("connect_timeout and idle_timeout must be positive")
        if isinstance(close_timeout, bool) or not isinstance(close_timeout, (int, float)) or not close_timeout > 0:
            raise ValueError(f"close_timeout must be a positive number of seconds, got {close_timeout!r}")
        if health_check is not None and not isinstance(health_check, HealthCheck):
            raise TypeError(f"health_check must be a HealthCheck, got {health_check!r}")
        self.balance = balance
        self.proxy_protocol = proxy_protocol
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.close_timeout = float(close_timeout)
        self.max_connections = max_connections
        self.health_check = health_check
        self.max_fails = max_fails
        self.fail_timeout = fail_timeout
        self.splice = splice and _splice.AVAILABLE
        self.backends: list[Backend] = []
        for d in descriptions:
            endpoint = clientFromString(reactor, d)
            if tls is not None and tls is not False:
                endpoint = wrapClientTLS(_tls_creator(tls, d), endpoint)
            else:
                # Plain TCP to an IP address on Linux: a non-blocking connect on a socket we own.
                endpoint = direct_endpoint(reactor, d) or endpoint
            self.backends.append(Backend(d, endpoint, tls is not None and tls is not False))
        self.transparent = bool(transparent)
        self._tls = tls
        if self.transparent:
            self._transparent_addresses = _transparent_addresses(descriptions)
        self.stats: dict[str, BackendStats] = {b.description: b.stats for b in self.backends}
        self.relays: set[Relay] = set()
        #: connections closed because no backend could take them, or max_connections.
        self.gave_up = 0
        self._next = 0
        self._random = random.Random()
        self._started = 0

    def _connect(self, backend: Backend, relay: Relay, factory: Factory) -> defer.Deferred[Any]:
        """Connect ``factory`` to ``backend``, from the client's address when transparent."""
        relay.transparent = False
        if self.transparent:
            source = ip_port(relay.info.source)
            if source is not None:
                host, port = self._transparent_addresses[backend.description]
                endpoint: IStreamClientEndpoint = TransparentEndpoint(self._reactor, host, port, source)
                if backend.tls:
                    endpoint = wrapClientTLS(_tls_creator(self._tls, backend.description), endpoint)
                relay.transparent = True
                return endpoint.connect(factory)
        return backend.endpoint.connect(factory)

    def __repr__(self) -> str:
        return f"Proxy({[b.description for b in self.backends]!r}, balance={self.balance!r})"

    # The process-wide splice pipe cap

    @staticmethod
    def set_max_pipes(limit: int) -> None:
        """
        Cap the ``splice(2)`` pipes open at once across the process (as
        HAProxy's ``maxpipes``). Each bulk direction of a spliced relay holds
        one pipe (two descriptors) for its life; a direction that would go
        past the cap keeps the copying relay (``recv``/``send``), every byte
        intact. ``0`` never opens a pipe. The default lets pipes hold at most
        a quarter of the process's descriptor limit: ``RLIMIT_NOFILE // 8``
        pipes, read at import.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"max pipes must be a whole number of pipes, 0 or more, got {limit!r}")
        _splice.pipes.limit = limit

    @staticmethod
    def pipe_usage() -> dict[str, int]:
        """The splice pipes across the process: ``open`` now, the ``limit``, and directions ``refused`` one."""
        budget = _splice.pipes
        return {"open": budget.open, "limit": budget.limit, "refused": budget.refused}

    # IProtocolFactory

    def doStart(self) -> None:
        """Start the active health checks when the first listener starts."""
        self._started += 1
        if self._started == 1 and self.health_check is not None:
            for b in self.backends:
                self._schedule_check(b, 0.0)

    def doStop(self) -> None:
        """Stop the active health checks when the last listener stops."""
        if self._started == 0:
            return
        self._started -= 1
        if self._started == 0:
            for b in self.backends:
                if b._check_call is not None and b._check_call.active():
                    b._check_call.cancel()
                b._check_call = None
                if b._probe is not None:
                    b._probe.stop()

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        return self.buildProtocolForConnection(addr, ConnectionInfo(peer=addr), "")

    def buildProtocolForConnection(self, addr: IAddress, info: ConnectionInfo, rule_name: str) -> IProtocol | None:
        if self.max_connections is not None and len(self.relays) >= self.max_connections:
            self.gave_up += 1
            log.warn(
                "rule {rule}: refusing {client}: max_connections ({limit}) reached",
                rule=rule_name,
                client=info.source,
                limit=self.max_connections,
            )
            return None
        relay_class = Relay if self.idle_timeout is None else _IdleTimedRelay
        return relay_class(self, info, rule_name)

    # Choosing

    def candidates(self, info: ConnectionInfo) -> list[Backend]:
        """The backends to try for a connection, in order: usable ones by the balancing rule, then the rest."""
        backends = self.backends
        n = len(backends)
        if self.balance == "round_robin":
            start = self._next % n
            self._next += 1
            ordered = backends[start:] + backends[:start]
        elif self.balance == "least_conn":
            start = self._next % n
            self._next += 1
            rotated = backends[start:] + backends[:start]
            ordered = sorted(rotated, key=lambda b: b.stats.active)
        elif self.balance == "random":
            ordered = list(backends)
            self._random.shuffle(ordered)
        elif self.balance == "source_hash":
            host = getattr(info.source, "host", None) or getattr(info.source, "name", None) or ""
            key = host.encode("utf-8", "surrogateescape") if isinstance(host, str) else bytes(host)
            start = zlib.crc32(key) % n
            ordered = backends[start:] + backends[:start]
        else:
            ordered = list(backends)
        now = self._reactor.seconds()
        usable = [b for b in ordered if b.usable(now)]
        # When every backend is marked down, trying them anyway costs a
        # connect attempt each and brings service back as soon as one recovers.
        return usable or ordered

    def _header(self, info: ConnectionInfo) -> bytes:
        assert self.proxy_protocol is not None
        # A trusted PROXY header carried the connection's original ends; pass
        # both on, not the balancer's address and our listening one.
        destination = info.proxy_destination if info.proxy_destination is not None else info.local
        return header_for(self.proxy_protocol, info.source, destination)

    # Passive health

    def _connect_failed(self, backend: Backend, kind: str) -> None:
        backend.stats.failures += 1
        backend.stats.errors[kind] = backend.stats.errors.get(kind, 0) + 1
        backend.failures_in_row += 1
        if backend.failures_in_row >= self.max_fails and backend.down_until <= self._reactor.seconds():
            backend.down_until = self._reactor.seconds() + self.fail_timeout
            log.warn(
                "backend {backend} skipped for {seconds}s after {count} failed connects in a row",
                backend=backend.description,
                seconds=self.fail_timeout,
                count=backend.failures_in_row,
            )

    def _connect_succeeded(self, backend: Backend) -> None:
        backend.failures_in_row = 0
        backend.down_until = 0.0
        backend.stats.active += 1
        backend.stats.total += 1

    # Active health

    def _schedule_check(self, backend: Backend, delay: float) -> None:
        backend._check_call = self._reactor.callLater(delay, self._check, backend)

    def _check(self, backend: Backend) -> None:
        backend._check_call = None
        assert self.health_check is not None
        backend._probe = _Probe(self, backend, self.health_check)
        backend._probe.start()

    def _check_done(self, backend: Backend, passed: bool, why: str) -> None:
        backend._probe = None
        hc = self.health_check
        assert hc is not None
        stats = backend.stats
        now = self._reactor.seconds()
        stats.last_check, stats.last_check_at = ("passed" if passed else why), now
        if stats.since is None:
            stats.since = now
        if passed:
            backend._checks_passed += 1
            backend._checks_failed = 0
            if not stats.healthy and backend._checks_passed >= hc.rise:
                stats.healthy, stats.since = True, now
                log.info("backend {backend} is healthy again", backend=backend.description)
        else:
            backend._checks_failed += 1
            backend._checks_passed = 0
            if stats.healthy and backend._checks_failed >= hc.fall:
                stats.healthy, stats.since = False, now
                log.warn("backend {backend} is down: {why}", backend=backend.description, why=why)
        if self._started:
            self._schedule_check(backend, hc.interval)


@implementer(IHandshakeListener)
class _Probe(Protocol):
    """
    One active health check connection: connect (and, to a TLS backend,
    complete the handshake and verify the certificate), maybe send, maybe
    expect, and close.
    """

    def __init__(self, proxy: Proxy, backend: Backend, check: HealthCheck) -> None:
        self.proxy = proxy
        self.backend = backend
        self.check = check
        self._buffer = b""
        self._done = False
        self._attempt: defer.Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None

    def start(self) -> None:
        self._timer = self.proxy._reactor.callLater(self.check.timeout, self._finish, False, "health check timed out")
        self._attempt = self.backend.endpoint.connect(_OneProtocol(self))
        self._attempt.addErrback(self._failed)

    def _failed(self, reason: Failure) -> None:
        self._attempt = None
        if not reason.check(defer.CancelledError, error.ConnectingCancelledError):
            self._finish(False, f"connect failed: {_describe(reason)}")

    def connectionMade(self) -> None:
        self._attempt = None
        if self._done:
            self._close(abort=True)
            return
        # A backend that wants PROXY headers would refuse a bare probe.
        if self.proxy.proxy_protocol == 1:
            self.transport.write(build_v1(None, None))  # type: ignore[union-attr]
        elif self.proxy.proxy_protocol == 2:
            self.transport.write(build_v2(None, None, local=True))  # type: ignore[union-attr]
        if self.check.send:
            self.transport.write(self.check.send)  # type: ignore[union-attr]
        if not self.check.expect and not self.backend.tls:
            self._finish(True, "")

    def handshakeCompleted(self) -> None:
        # TLS backends only: without ``expect``, the check passes once the
        # handshake is done and the certificate verified, not at TCP connect.
        if self._done or self.check.expect or _verification_failed(self.transport):
            return
        self._finish(True, "")

    def dataReceived(self, data: bytes) -> None:
        expect = self.check.expect
        if self._done or not expect:
            return
        self._buffer += data
        if expect in self._buffer:
            self._finish(True, "")
        elif len(self._buffer) > len(expect) + 65536:
            self._finish(False, "the expected bytes did not come in the first 64 KiB")
        else:
            # Keep only what could still hold the start of the expected bytes.
            self._buffer = self._buffer[-(len(expect) - 1) :] if len(expect) > 1 else b""

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
        if not self._done:
            self._finish(False, f"closed before the check passed: {_describe(reason)}")

    def stop(self) -> None:
        """Abandon this check (the proxy stops)."""
        if not self._done:
            self._done = True
            self._cleanup()
            self._close(abort=True)

    def _cleanup(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._attempt is not None:
            attempt, self._attempt = self._attempt, None
            attempt.cancel()

    def _close(self, *, abort: bool) -> None:
        transport = self.transport
        if transport is not None:
            if abort:
                transport.abortConnection()  # type: ignore[attr-defined]
            else:
                transport.loseConnection()

    def _finish(self, passed: bool, why: str) -> None:
        if self._done:
            return
        self._done = True
        timed_out = self._timer is not None and not self._timer.active()
        self._cleanup()
        self._close(abort=not passed or timed_out)
        self.proxy._check_done(self.backend, passed, why)


class _OneProtocol(Factory):
    """A factory handing out one protocol instance that already exists."""

    # One factory per backend connection: "Starting factory" logs would cost
    # every new relay a log event.
    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self._protocol


@implementer(IHalfCloseableProtocol)
class _BackendSide(Protocol):
    """The backend's end of a relay."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.ready = False
        self.read_closed = False
        self.write_closed = False
        self.lost = False

    def connectionMade(self) -> None:
        if not self.relay.backend_tls:
            self.ready = True
            self.relay._backend_ready(self)

    def dataReceived(self, data: bytes) -> None:
        # Replaced by the client transport's write once the relay runs.
        self.relay.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.read_closed = True
        self.relay._backend_eof()

    def writeConnectionLost(self) -> None:
        self.write_closed = True
        if self.read_closed and self.transport is not None:
            self.relay._close(self.transport)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
        self.lost = True
        self.relay._backend_lost(self, reason)


@implementer(IHandshakeListener)
class _TLSBackendSide(_BackendSide):
    """A backend end reached over TLS: ready once the handshake (and verification) is done."""

    def handshakeCompleted(self) -> None:
        if _verification_failed(self.transport):
            return
        self.ready = True
        self.relay._backend_ready(self)


def _verification_failed(transport: object) -> bool:
    """
    Whether a TLS transport reporting a completed handshake was aborted in
    it: a failed hostname check aborts the connection from inside the
    handshake, which may still report completion afterwards.
    """
    return bool(getattr(transport, "_aborted", False))


def _can_half_close(transport: object) -> bool:
    """
    Whether ``transport`` itself can shut its writing side alone: a plain TCP
    or UNIX stream, not TLS.

    Looked up on the class, never on the instance: a TLS transport
    (``TLSMemoryBIOProtocol``, any ``ProtocolWrapper``) forwards attributes
    it lacks to the TCP transport under it, whose FIN would cut the TLS
    stream without a ``close_notify``. TLS has no half-close of its own that
    Twisted can send, and ``startTLS`` on a TCP transport marks it
    ``ISSLTransport``.
    """
    return getattr(type(transport), "loseWriteConnection", None) is not None and not ISSLTransport.providedBy(transport)


def _half_close(transport: ITransport) -> bool:
    """Shut our writing side; ``False`` where the transport cannot (TLS), leaving it open."""
    if not _can_half_close(transport):
        return False
    transport.loseWriteConnection()  # type: ignore[attr-defined]
    return True


def _unsent(transport: object) -> int:
    """Bytes a Twisted transport holds to write, where it says."""
    if transport is None or not hasattr(transport, "dataBuffer"):
        return 0
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen  # type: ignore[attr-defined,no-any-return]


def _wire_unsent(transport: object) -> int:
    """Bytes a transport still holds to put on the wire, under its TLS layer if it has one."""
    if isinstance(transport, TLSMemoryBIOProtocol):
        return _unsent(transport.transport) + sum(len(d) for d in transport._appSendBuffer)
    return _unsent(transport)


def _abort(transport: ITransport) -> None:
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:
        transport.loseConnection()


@implementer(IHalfCloseableProtocol, IConnectionReport)
class Relay(Protocol):
    """
    The client's end of one relay, and the relay itself.

    :ivar info: the connection as the sniffer saw it.
    :ivar backend: the backend being tried or relayed to.
    :ivar side: the backend end, once a backend has connected.
    :ivar spliced: whether the relay runs kernel-side with ``splice(2)``.
    """

    spliced = False

    def __init__(self, proxy: Proxy, info: ConnectionInfo, rule_name: str) -> None:
        self.proxy = proxy
        self.info = info
        self.rule_name = rule_name
        self.backend: Backend | None = None
        self.backend_tls = False
        #: whether the backend connection was made from the client's address.
        self.transparent = False
        self.side: _BackendSide | None = None
        self._pending: list[bytes] | None = []
        self._candidates: list[Backend] = []
        self._attempt: defer.Deferred[Any] | None = None
        self._trying: _BackendSide | None = None
        self._timer: IDelayedCall | None = None
        self._timed_out = False
        self._client_read_closed = False
        self._client_write_closed = False
        self._client_lost = False
        self._ended = False
        self._splice: _splice.Splice | None = None
        #: ends the relay has closed that have not gone yet, with the bytes
        #: each still held to write at the last look.
        self._closing: dict[ITransport, int] = {}
        self._close_call: IDelayedCall | None = None
        self._bytes_in = 0
        self._bytes_out = 0

    @property
    def bytes_in(self) -> int:
        """Bytes relayed from the client to the backend (sniffed bytes and PROXY header included)."""
        return self._splice.bytes_in if self._splice is not None else self._bytes_in

    @property
    def bytes_out(self) -> int:
        """Bytes relayed from the backend to the client."""
        return self._splice.bytes_out if self._splice is not None else self._bytes_out

    @property
    def backend_failed(self) -> bool:
        """Whether the relay ended without ever reaching a backend."""
        return self.side is None

    def buffered(self) -> int:
        """Bytes the relay holds that neither end has taken yet (what backpressure bounds)."""
        if self._splice is not None:
            return self._splice.buffered()
        return sum(_unsent(t) for t in (self.transport, self.side.transport if self.side else None))

    def _unsplice(self) -> None:
        if self._splice is not None:
            self._splice.stop()

    def __repr__(self) -> str:
        backend = self.backend.description if self.backend else None
        return f"<Relay {self.info.source} -> {backend}>"

    # The client's end

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        transport.pauseProducing()  # type: ignore[attr-defined]
        if self.info.local is None:
            self.info = self.info.evolve(local=transport.getHost(), peer=self.info.peer or transport.getPeer())
        self.proxy.relays.add(self)
        self._candidates = self.proxy.candidates(self.info)
        self._try_next()

    def dataReceived(self, data: bytes) -> None:
        # Until the backend connects; then replaced by the backend transport's write.
        if self._pending is not None:
            self._pending.append(data)
        elif self.side is not None:
            self.side.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self._client_read_closed = True
        side = self.side
        if side is not None and not side.lost:
            transport = side.transport
            assert transport is not None
            transport.unregisterProducer()  # type: ignore[attr-defined]
            _half_close(transport)
        self._close_client_if_done()

    def writeConnectionLost(self) -> None:
        self._client_write_closed = True
        self._close_client_if_done()

    def _close_client_if_done(self) -> None:
        if self._client_read_closed and self._client_write_closed and self.transport is not None:
            self._close(self.transport)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
        self._client_lost = True
        self._unsplice()
        self._cancel_attempt()
        side = self.side
        if side is not None and not side.lost:
            transport = side.transport
            assert transport is not None
            if reason.check(error.ConnectionDone):
                transport.unregisterProducer()  # type: ignore[attr-defined]
                self._close(transport)
            else:
                _abort(transport)
        self._maybe_end()

    # The backend's end

    def _try_next(self) -> None:
        proxy = self.proxy
        if not self._candidates:
            proxy.gave_up += 1
            log.warn(
                "rule {rule}: no backend could take {client}; closing it",
                rule=self.rule_name,
                client=self.info.source,
            )
            assert self.transport is not None
            self._close(self.transport)
            return
        backend = self._candidates.pop(0)
        self.backend = backend
        self.backend_tls = backend.tls
        side = (_TLSBackendSide if backend.tls else _BackendSide)(self)
        self._trying = side
        self._timed_out = False
        self._timer = proxy._reactor.callLater(proxy.connect_timeout, self._connect_timed_out)
        attempt = proxy._connect(backend, self, _OneProtocol(side))
        if self._trying is side and not side.ready:
            self._attempt = attempt
        attempt.addCallbacks(self._attempt_connected, self._attempt_failed, callbackArgs=(side,), errbackArgs=(side,))

    def _connect_timed_out(self) -> None:
        self._timer = None
        self._timed_out = True
        if self._attempt is not None:
            self._attempt.cancel()
        elif self._trying is not None and self._trying.transport is not None:
            # Connected, but the TLS handshake did not finish in time.
            _abort(self._trying.transport)

    def _cancel_attempt(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        attempt, self._attempt = self._attempt, None
        trying, self._trying = self._trying, None
        if attempt is not None:
            attempt.cancel()
        elif trying is not None and trying.transport is not None and not trying.lost:
            _abort(trying.transport)

    def _attempt_connected(self, protocol: object, side: _BackendSide) -> None:
        # With TLS the handshake is still to come; the timer keeps running.
        if self._trying is side:
            self._attempt = None

    def _attempt_failed(self, reason: Failure, side: _BackendSide) -> None:
        if self._trying is side:
            self._attempt = None
            self._failed(side, reason)

    def _failed(self, side: _BackendSide, reason: Failure) -> None:
        """A connect attempt failed: refused, timed out, reset or TLS refused."""
        self._trying = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._client_lost:
            return
        backend = self.backend
        assert backend is not None
        kind = "timeout" if self._timed_out else _kind(reason)
        what = f"no connection within {self.proxy.connect_timeout}s" if self._timed_out else _describe(reason)
        self.proxy._connect_failed(backend, kind)
        log.warn(
            "rule {rule}: backend {backend} failed for {client}: {kind}: {problem}",
            rule=self.rule_name,
            backend=backend.description,
            client=self.info.source,
            kind=kind,
            problem=what,
        )
        self._try_next()

    def _backend_ready(self, side: _BackendSide) -> None:
        if self._trying is not side:
            return
        self._trying = None
        self._attempt = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        backend_transport = side.transport
        client_transport = self.transport
        assert backend_transport is not None and client_transport is not None and self.backend is not None
        if self._client_lost:
            _abort(backend_transport)
            return
        self.side = side
        self.proxy._connect_succeeded(self.backend)
        if self.transparent:
            self.backend.stats.transparent += 1
        pending, self._pending = self._pending or [], None
        if self.proxy.proxy_protocol is not None:
            pending.insert(0, self.proxy._header(self.info))
        first = b"".join(pending)
        if self._start_splice(client_transport, backend_transport, first):
            self._linked()
            return
        if first:
            self._bytes_in += len(first)
            backend_transport.write(first)
        client_transport.registerProducer(backend_transport, True)  # type: ignore[attr-defined]
        backend_transport.registerProducer(client_transport, True)  # type: ignore[attr-defined]
        self._link(client_transport, backend_transport, side)
        self._linked()
        if self._client_read_closed:
            backend_transport.unregisterProducer()  # type: ignore[attr-defined]
            _half_close(backend_transport)
        else:
            client_transport.resumeProducing()  # type: ignore[attr-defined]

    def _start_splice(self, client_transport: ITransport, backend_transport: ITransport, first: bytes) -> bool:
        """Relay with ``splice(2)`` from now on, if the proxy allows it and both ends can."""
        if not (
            self.proxy.splice
            and not self._client_read_closed
            and _splice.spliceable(client_transport)
            and _splice.spliceable(backend_transport)
        ):
            return False
        splice = _splice.Splice(
            client_transport,  # type: ignore[arg-type]
            backend_transport,  # type: ignore[arg-type]
            first,
            client_transport.reactor,  # type: ignore[attr-defined]
        )
        self._splice = splice
        self.spliced = True
        splice.start()
        return True

    def _link(self, client_transport: ITransport, backend_transport: ITransport, side: _BackendSide) -> None:
        """From now on each chunk is counted and written to the other transport, and nothing else."""
        to_backend = backend_transport.write
        to_client = client_transport.write

        def from_client(data: bytes) -> None:
            self._bytes_in += len(data)
            to_backend(data)

        def from_backend(data: bytes) -> None:
            self._bytes_out += len(data)
            to_client(data)

        self.dataReceived = from_client  # type: ignore[method-assign]
        side.dataReceived = from_backend  # type: ignore[method-assign]

    def _linked(self) -> None:
        """Hook for subclasses: bytes flow from now on."""

    def _backend_eof(self) -> None:
        client_transport = self.transport
        side = self.side
        assert side is not None and side.transport is not None
        if client_transport is not None and not self._client_lost:
            client_transport.unregisterProducer()  # type: ignore[attr-defined]
            if not _half_close(client_transport):
                self._close(client_transport)
        if side.write_closed:
            self._close(side.transport)

    def _backend_lost(self, side: _BackendSide, reason: Failure) -> None:
        self._unsplice()
        if self.side is not side:
            # Lost before the relay ran: a failed connect or TLS handshake.
            if self._trying is side:
                self._attempt = None
                self._failed(side, reason)
            return
        client_transport = self.transport
        if not self._client_lost and client_transport is not None:
            if reason.check(error.ConnectionDone):
                client_transport.unregisterProducer()  # type: ignore[attr-defined]
                self._close(client_transport)
            else:
                backend = self.backend
                assert backend is not None
                kind = _kind(reason)
                backend.stats.failures += 1
                backend.stats.errors["reset"] = backend.stats.errors.get("reset", 0) + 1
                log.warn(
                    "rule {rule}: backend {backend} reset the relay for {client} mid-stream ({kind}: {problem})",
                    rule=self.rule_name,
                    backend=backend.description,
                    client=self.info.source,
                    kind=kind,
                    problem=_describe(reason),
                )
                _abort(client_transport)
        self._maybe_end()

    def _maybe_end(self) -> None:
        if self._ended or not self._client_lost:
            return
        if self.side is not None and not self.side.lost:
            return
        self._ended = True
        self._unsplice()
        self._pending = None
        if self.side is not None and self.backend is not None:
            self.backend.stats.active -= 1
            self.backend.stats.bytes_in += self.bytes_in
            self.backend.stats.bytes_out += self.bytes_out
        self.proxy.relays.discard(self)
        self._closing.clear()
        if self._close_call is not None and self._close_call.active():
            self._close_call.cancel()
        self._close_call = None
        self._stop_timers()

    # Closing ends that do not go away

    def _close(self, transport: ITransport) -> None:
        """
        Close one end cleanly, and abort it if it is still there after
        ``close_timeout`` seconds in which its peer took no byte: a TLS
        client that never answers our ``close_notify`` (the TLS layer waits
        for that answer before closing the socket), or a reader that stopped
        reading what we still have to write.
        """
        transport.loseConnection()
        if self._ended or self._gone(transport) or transport in self._closing:
            return
        self._closing[transport] = _wire_unsent(transport)
        if self._close_call is None:
            self._close_call = self.proxy._reactor.callLater(self.proxy.close_timeout, self._check_closing)

    def _gone(self, transport: ITransport) -> bool:
        if transport is self.transport:
            return self._client_lost
        side = self.side
        return side is None or transport is not side.transport or side.lost

    def _check_closing(self) -> None:
        self._close_call = None
        for transport, before in list(self._closing.items()):
            if self._gone(transport):
                del self._closing[transport]
                continue
            now = _wire_unsent(transport)
            if 0 < now < before:
                # Still draining to a slow reader: it gets more time.
                self._closing[transport] = now
                continue
            del self._closing[transport]
            log.info(
                "rule {rule}: {end} of {client}'s relay still open {seconds}s after it was closed; aborted",
                rule=self.rule_name,
                end="client end" if transport is self.transport else "backend end",
                client=self.info.source,
                seconds=self.proxy.close_timeout,
            )
            _abort(transport)
        if self._closing and not self._ended:
            self._close_call = self.proxy._reactor.callLater(self.proxy.close_timeout, self._check_closing)

    def _stop_timers(self) -> None:
        """Hook for subclasses with timers of their own."""


class _IdleTimedRelay(Relay):
    """A relay that closes both ends after ``idle_timeout`` seconds without a byte either way."""

    _TICKS = 4

    def __init__(self, proxy: Proxy, info: ConnectionInfo, rule_name: str) -> None:
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
