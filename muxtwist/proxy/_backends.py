"""
The backends of a :class:`~muxtwist.proxy.Proxy`: their counters and health
state, choosing one for a connection (the balancing rules), passive health
(skipping a backend after failed connects in a row), and naming why a
connection to one failed.
"""

from __future__ import annotations

import ipaddress
import random
import re
import zlib
from collections.abc import Sequence
from typing import Protocol as TypingProtocol

import attrs
from twisted.internet import defer, error
from twisted.internet.interfaces import IAddress, IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

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
        host, port = _host_of(d), re.search(r"(?:^|:)port=(\d+)(?::|$)", d)
        if not d.startswith(("tcp:", "tcp6:")) or host is None or port is None:
            raise ValueError(f"transparent=True needs tcp:host=ADDRESS:port=N backends, got {d!r}")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"transparent=True needs the backend's IP address, not a name: {d!r}") from None
        ignored = re.search(r"(?:^|:)(bindAddress|timeout)=", d)
        if ignored is not None:
            raise ValueError(
                f"transparent=True connects from the client's address with Proxy's connect_timeout; "
                f"{ignored.group(1)}= in {d!r} would be ignored: remove it"
            )
        addresses[d] = (host, int(port.group(1)))
    return addresses


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

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self._protocol
