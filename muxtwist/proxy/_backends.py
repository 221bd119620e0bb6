"""
The backends of a :class:`~muxtwist.proxy.Proxy`: their counters and health
state, choosing one for a connection (the balancing rules), and passive
health (skipping a backend after failed connects in a row).
"""

from __future__ import annotations

import ipaddress
import random
import re
import zlib
from collections.abc import Sequence
from typing import Protocol as TypingProtocol

import attrs
from twisted.internet.interfaces import IAddress, IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from muxtwist._descriptions import split_description
from muxtwist.interfaces import ConnectionInfo
from muxtwist.transparent import TransparentUnavailable, unavailable_reason

__all__ = ["BALANCE", "Backend", "BackendStats", "connect_failed", "connect_succeeded", "ordered"]

log = Logger(namespace="muxtwist.proxy")

BALANCE = ("round_robin", "least_conn", "random", "first", "source_hash")


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


class _Check(TypingProtocol):
    """A running active health check (``muxtwist.proxy._health``), as a backend holds it."""

    def stop(self) -> None: ...


def _host_of(description: str) -> str | None:
    """The ``host=`` of a client endpoint description, if it names one."""
    return split_description(description)[1].get("host") or None


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
        self._probe: _Check | None = None

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
        positional, named = split_description(d)
        host, port = named.get("host"), named.get("port", "")
        if positional[0] not in ("tcp", "tcp6") or not host or not re.fullmatch(r"\d+", port):
            raise ValueError(f"transparent=True needs tcp:host=ADDRESS:port=N backends, got {d!r}")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"transparent=True needs the backend's IP address, not a name: {d!r}") from None
        ignored = [option for option in named if option in ("bindAddress", "timeout")]
        if ignored:
            raise ValueError(
                f"transparent=True connects from the client's address with Proxy's connect_timeout; "
                f"{ignored[0]}= in {d!r} would be ignored: remove it"
            )
        addresses[d] = (host, int(port))
    return addresses


# Choosing


def ordered(
    backends: Sequence[Backend], balance: str, turn: int, rng: random.Random, info: ConnectionInfo, now: float
) -> list[Backend]:
    """
    The backends to try for a connection, in order: usable ones by the
    balancing rule ``balance``, then the rest. ``turn`` counts the choices
    made so far (the rotation of ``round_robin`` and ``least_conn``).
    """
    n = len(backends)
    if balance == "round_robin":
        start = turn % n
        order = [*backends[start:], *backends[:start]]
    elif balance == "least_conn":
        start = turn % n
        rotated = [*backends[start:], *backends[:start]]
        order = sorted(rotated, key=lambda b: b.stats.active)
    elif balance == "random":
        order = list(backends)
        rng.shuffle(order)
    elif balance == "source_hash":
        host = getattr(info.source, "host", None) or getattr(info.source, "name", None) or ""
        key = host.encode("utf-8", "surrogateescape") if isinstance(host, str) else bytes(host)
        start = zlib.crc32(key) % n
        order = [*backends[start:], *backends[:start]]
    else:
        order = list(backends)
    usable = [b for b in order if b.usable(now)]
    # When every backend is marked down, trying them anyway costs a
    # connect attempt each and brings service back as soon as one recovers.
    return usable or order


# Passive health


def connect_failed(backend: Backend, kind: str, max_fails: int, fail_timeout: float, now: float) -> None:
    """Count a failed connect of ``kind``; skip ``backend`` for ``fail_timeout`` after ``max_fails`` in a row."""
    backend.stats.failures += 1
    backend.stats.errors[kind] = backend.stats.errors.get(kind, 0) + 1
    backend.failures_in_row += 1
    if backend.failures_in_row >= max_fails and backend.down_until <= now:
        backend.down_until = now + fail_timeout
        log.warn(
            "backend {backend} skipped for {seconds}s after {count} failed connects in a row",
            backend=backend.description,
            seconds=fail_timeout,
            count=backend.failures_in_row,
        )


def connect_succeeded(backend: Backend) -> None:
    """A relay to ``backend`` connected: passive health forgets its failures."""
    backend.failures_in_row = 0
    backend.down_until = 0.0
    backend.stats.active += 1
    backend.stats.total += 1


class _OneProtocol(Factory):
    """A factory handing out one protocol instance that already exists."""

    # One factory per backend connection: "Starting factory" logs would cost
    # every new relay a log event.
    noisy = False

    #: the connect this factory waits for, where muxtwist._connect makes it.
    connecting: object = None

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self._protocol
