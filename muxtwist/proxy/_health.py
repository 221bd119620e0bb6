"""
Active health checks of a :class:`~muxtwist.proxy.Proxy`'s backends: every
``interval`` a probe connection to each backend; ``rise`` passes in a row
mark it healthy, ``fall`` failures in a row mark it down.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from muxtwist import _transports as transports
from muxtwist._failures import connect_failure_text
from muxtwist._options import OptionError
from muxtwist._twisted import was_aborted
from muxtwist.matchers.proxy_protocol import build_v1, build_v2
from muxtwist.proxy._backends import Backend, _OneProtocol

__all__ = ["HealthCheck", "HealthChecks"]

log = Logger(namespace="muxtwist.proxy")


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    whole = attribute.name in ("rise", "fall")
    kinds = int if whole else int | float
    # Seconds are not NaN, infinity or an int beyond a float: callLater would raise at each check.
    if (
        isinstance(value, bool)
        or not isinstance(value, kinds)
        or not value > 0
        or not (whole or value <= sys.float_info.max)
    ):
        expected = "a positive integer" if whole else "a positive number of seconds"
        raise OptionError("HealthCheck", attribute.name, value, expected)


def _optional_bytes(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, bytes):
        raise OptionError("HealthCheck", attribute.name, value, "bytes or None")


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
    send: bytes | None = attrs.field(default=None, validator=_optional_bytes)
    expect: bytes | None = attrs.field(default=None, validator=_optional_bytes)


class HealthChecks:
    """
    The active health checks of one proxy's backends, while it runs.

    :param proxy_protocol: the PROXY header version the backends expect
        (a probe sends a ``LOCAL`` one), or ``None``.
    """

    def __init__(self, check: HealthCheck, proxy_protocol: int | None, reactor: IReactorTime) -> None:
        self.check = check
        self.proxy_protocol = proxy_protocol
        self._reactor = reactor
        self.running = False

    def start(self, backends: Sequence[Backend]) -> None:
        """Check every backend now, then every ``interval``."""
        self.running = True
        for b in backends:
            self._schedule(b, 0.0)

    def stop(self, backends: Sequence[Backend]) -> None:
        """Cancel the next checks and abandon those under way."""
        self.running = False
        for b in backends:
            if b._check_call is not None and b._check_call.active():
                b._check_call.cancel()
            b._check_call = None
            if b._probe is not None:
                b._probe.stop()

    def _schedule(self, backend: Backend, delay: float) -> None:
        backend._check_call = self._reactor.callLater(delay, self._check, backend)

    def _check(self, backend: Backend) -> None:
        backend._check_call = None
        probe = _Probe(self, backend, self.check)
        backend._probe = probe
        probe.start()

    def _check_done(self, backend: Backend, passed: bool, why: str) -> None:
        backend._probe = None
        hc = self.check
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
        if self.running:
            self._schedule(backend, hc.interval)


@implementer(IHandshakeListener)
class _Probe(Protocol):
    """
    One active health check connection: connect (and, to a TLS backend,
    complete the handshake and verify the certificate), maybe send, maybe
    expect, and close.
    """

    def __init__(self, checks: HealthChecks, backend: Backend, check: HealthCheck) -> None:
        self.checks = checks
        self.backend = backend
        self.check = check
        self._buffer = b""
        self._done = False
        self._attempt: defer.Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None

    def start(self) -> None:
        self._timer = self.checks._reactor.callLater(self.check.timeout, self._finish, False, "health check timed out")
        self._attempt = self.backend.endpoint.connect(_OneProtocol(self))
        self._attempt.addErrback(self._failed)

    def _failed(self, reason: Failure) -> None:
        self._attempt = None
        if not reason.check(defer.CancelledError, error.ConnectingCancelledError):
            self._finish(False, f"connect failed: {connect_failure_text(reason)}")

    def connectionMade(self) -> None:
        self._attempt = None
        if self._done:
            self._close(abort=True)
            return
        # A backend that wants PROXY headers would refuse a bare probe.
        if self.checks.proxy_protocol == 1:
            self.transport.write(build_v1(None, None))  # type: ignore[union-attr]
        elif self.checks.proxy_protocol == 2:
            self.transport.write(build_v2(None, None, local=True))  # type: ignore[union-attr]
        if self.check.send:
            self.transport.write(self.check.send)  # type: ignore[union-attr]
        if not self.check.expect and not self.backend.tls:
            self._finish(True, "")

    def handshakeCompleted(self) -> None:
        # TLS backends only: without ``expect``, the check passes once the
        # handshake is done and the certificate verified, not at TCP connect
        # (a failed hostname check aborts inside a handshake that may still complete).
        if self._done or self.check.expect or was_aborted(self.transport):
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
            self._finish(False, f"closed before the check passed: {connect_failure_text(reason)}")

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
                transports.abort(transport)
            else:
                transport.loseConnection()

    def _finish(self, passed: bool, why: str) -> None:
        if self._done:
            return
        self._done = True
        timed_out = self._timer is not None and not self._timer.active()
        self._cleanup()
        self._close(abort=not passed or timed_out)
        self.checks._check_done(self.backend, passed, why)
