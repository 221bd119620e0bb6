"""
The :class:`Proxy` factory: its configuration, the backends' endpoints, and
one relay per connection (``muxtwist.proxy._relay``) to the backend the
balancing rule picks (``muxtwist.proxy._backends``).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.interfaces import IAddress, IProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from muxtwist._connect import direct_endpoint
from muxtwist._deadlines import Deadline, Deadlines
from muxtwist._options import OptionError, check_proxy
from muxtwist._twisted import default_reactor
from muxtwist.interfaces import BackendState, ConnectionInfo, IBackendPool, IConnectionInfoFactory, RelayState
from muxtwist.proxy import _splice
from muxtwist.proxy._backends import (
    BALANCE,
    Backend,
    BackendStats,
    _transparent_addresses,
    connect_failed,
    connect_succeeded,
    ordered,
)
from muxtwist.proxy._failure_log import FailureLog
from muxtwist.proxy._health import HealthCheck, HealthChecks
from muxtwist.proxy._idle import IdleTimedRelay
from muxtwist.proxy._relay import Relay
from muxtwist.proxy._tls import _tls_creator
from muxtwist.proxyprotocol import header_for, ip_port
from muxtwist.transparent import TransparentEndpoint, source_for

__all__ = ["Proxy"]

log = Logger(namespace="muxtwist.proxy")


@implementer(IConnectionInfoFactory, IBackendPool)
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
        PROXY protocol log the real client. Needs ``CAP_NET_RAW`` or ``CAP_NET_ADMIN`` (checked
        here: with neither, construction fails with one line saying how to fix
        it), ``tcp:`` backends given by IP address, and the host routing that
        ``python -m muxtwist doctor`` checks. A client that has no IP address
        (a UNIX-socket listener) is relayed from the host's own address.
    :param reactor: the reactor to connect and to time with.

    :ivar stats: the :class:`BackendStats` of each backend, by description.
    :ivar relays: the relays open now.

    It is an :class:`~muxtwist.interfaces.IBackendPool`: metrics and the
    stats page read its backends through :meth:`backend_states` and
    :meth:`open_relays` only.
    """

    #: every connection handed to it is relayed (a listener whose rules only relay reads its
    #: clients in the splice poller from their accept on: muxtwist.proxy._polled).
    relays_connections = True

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
        reactor = self._reactor = default_reactor(reactor)
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
        if not isinstance(transparent, bool):
            raise OptionError("Proxy", "transparent", transparent, "True or False")
        descriptions = [backends] if isinstance(backends, str) else list(backends)
        if not descriptions or not all(isinstance(d, str) for d in descriptions):
            raise ValueError(f"Proxy needs one or more endpoint description strings, got {backends!r}")
        if balance not in BALANCE:
            raise ValueError(f"balance must be one of {', '.join(BALANCE)}; got {balance!r}")
        if proxy_protocol not in (None, 1, 2):
            raise ValueError(f"proxy_protocol must be None, 1 or 2, got {proxy_protocol!r}")
        if connect_timeout <= 0 or (idle_timeout is not None and idle_timeout <= 0):
            raise ValueError("connect_timeout and idle_timeout must be positive")
        if (
            isinstance(close_timeout, bool)
            or not isinstance(close_timeout, (int, float))
            or not 0 < close_timeout <= sys.float_info.max
        ):
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
        #: the lines of failed connects and of gave_up, at most one a second per backend and per rule.
        self._failure_log = FailureLog(reactor)
        self._next = 0
        self._random = random.Random()
        self._started = 0
        self._health = None if health_check is None else HealthChecks(health_check, proxy_protocol, reactor)
        #: every relay's connect_timeout, behind one DelayedCall (made on the first relay).
        self._connect_deadlines: Deadlines | None = None

    def _connect_deadline(self, callback: Callable[[], object]) -> Deadline:
        """Call ``callback`` after ``connect_timeout`` seconds unless the returned timer is cancelled."""
        deadlines = self._connect_deadlines
        if deadlines is None or deadlines.delay != self.connect_timeout:
            deadlines = self._connect_deadlines = Deadlines(self._reactor, self.connect_timeout)
        return deadlines.add(callback)

    def _connect(self, backend: Backend, relay: Relay, factory: Factory) -> defer.Deferred[Any]:
        """Connect ``factory`` to ``backend``, from the client's address when transparent."""
        relay.transparent = False
        if self.transparent:
            client = ip_port(relay.info.source)
            host, port = self._transparent_addresses[backend.description]
            # A client of the other IP version is relayed from this host's address, as a UNIX one is.
            source = None if client is None else source_for(host, client)
            if source is not None:
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
        if self._started == 1 and self._health is not None:
            self._health.start(self.backends)

    def doStop(self) -> None:
        """Stop the active health checks when the last listener stops, and log the failures not logged yet."""
        if self._started == 0:
            return
        self._started -= 1
        if self._started == 0:
            if self._health is not None:
                self._health.stop(self.backends)
            self._failure_log.flush()

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        return self.buildProtocolForConnection(addr, ConnectionInfo(peer=addr), "")

    def buildProtocolForConnection(self, addr: IAddress, info: ConnectionInfo, rule_name: str) -> IProtocol | None:
        if self.max_connections is not None and len(self.relays) >= self.max_connections:
            self.gave_up += 1
            self._failure_log.refused(rule_name, info.source, self.max_connections)
            return None
        relay_class = Relay if self.idle_timeout is None else IdleTimedRelay
        return relay_class(self, info, rule_name)

    # Choosing

    def candidates(self, info: ConnectionInfo) -> list[Backend]:
        """The backends to try for a connection, in order: usable ones by the balancing rule, then the rest."""
        turn = self._next
        if self.balance in ("round_robin", "least_conn"):
            self._next += 1
        if len(self.backends) == 1 and not self.transparent:
            # One backend: every balancing rule tries it, usable or not.
            return [self.backends[0]]
        order = ordered(self.backends, self.balance, turn, self._random, info, self._reactor.seconds())
        client = ip_port(info.source) if self.transparent else None
        if client is not None:
            # Backends of the client's IP version first: those can be connected to from its address.
            addresses = self._transparent_addresses
            order.sort(key=lambda b: source_for(addresses[b.description][0], client) is None)
        return order

    def _header(self, info: ConnectionInfo) -> bytes:
        assert self.proxy_protocol is not None
        # A trusted PROXY header carried the connection's original ends; pass
        # both on, not the balancer's address and our listening one.
        destination = info.proxy_destination if info.proxy_destination is not None else info.local
        return header_for(self.proxy_protocol, info.source, destination)

    # IBackendPool

    def backend_states(self) -> list[BackendState]:
        """A snapshot of each backend, in configuration order."""
        now = self._reactor.seconds()
        checked = self.health_check is not None
        states = []
        for backend in self.backends:
            stats = backend.stats
            states.append(
                BackendState(
                    description=backend.description,
                    usable=backend.usable(now),
                    active=stats.active,
                    total=stats.total,
                    transparent=stats.transparent,
                    failures=stats.failures,
                    errors=dict(stats.errors),
                    bytes_in=stats.bytes_in,
                    bytes_out=stats.bytes_out,
                    checked=checked,
                    healthy=stats.healthy,
                    since=stats.since,
                    last_check=stats.last_check,
                    last_check_at=stats.last_check_at,
                    skipped_until=backend.down_until if backend.down_until > now else None,
                )
            )
        return states

    def open_relays(self) -> list[RelayState]:
        """Each relay connected to a backend now, with the bytes it has moved so far."""
        return [
            RelayState(relay.rule_name, relay.backend.description, relay.bytes_in, relay.bytes_out)
            for relay in list(self.relays)
            if relay.side is not None and relay.backend is not None
        ]

    # Passive health

    def _connect_failed(self, backend: Backend, kind: str) -> None:
        connect_failed(backend, kind, self.max_fails, self.fail_timeout, self._reactor.seconds())

    def _connect_succeeded(self, backend: Backend) -> None:
        connect_succeeded(backend)
