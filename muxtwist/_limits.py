"""
Connection limits of the sniffer and the accounting behind them: connections
per source host (``max_connections_per_source``), and refusals, which are
reported to the connection observer and logged at most once a second per
limit and rule (as are PROXY pre-stage refusals and the ``connection_end``
lines of refused connections, so a connect loop cannot flood the log).
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from muxtwist._rules import Outcome
from muxtwist._text import LogThrottle, printable
from muxtwist.interfaces import IConnectionObserver

__all__ = ["PerSource", "Refusals", "address_text", "host_of"]

log = Logger(namespace="muxtwist.sniffing")


def host_of(address: object) -> str | None:
    """The host part of a TCP address, the key of ``max_connections_per_source``."""
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else None


def address_text(address: object) -> str:
    """
    ``host:port`` of a TCP address, the path of a UNIX one, ``str``
    otherwise; escaped by :func:`~muxtwist._text.printable`, since a PROXY
    header's source (a UNIX path above all) is whatever the client claimed.
    """
    host = getattr(address, "host", None)
    if isinstance(host, str):
        text = f"[{host}]:{getattr(address, 'port', '')}" if ":" in host else f"{host}:{getattr(address, 'port', '')}"
        return printable(text)
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        return printable(name)
    return printable(address)


class PerSource:
    """Live connections per source host."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def take(self, source: str | None, limit: int | None) -> bool:
        """Count one more connection from ``source``, unless it is at ``limit``."""
        if source is None or limit is None:
            return True
        n = self.counts.get(source, 0)
        if n >= limit:
            return False
        self.counts[source] = n + 1
        return True

    def release(self, source: str) -> None:
        """A connection from ``source`` ended."""
        n = self.counts.get(source, 0) - 1
        if n > 0:
            self.counts[source] = n
        else:
            self.counts.pop(source, None)


class Refusals:
    """Connections closed at once by a limit: told to the observer, logged throttled."""

    def __init__(self, reactor: IReactorTime) -> None:
        self._throttle = LogThrottle(reactor)

    def refused(self, observer: IConnectionObserver, peer: object, limit: str, value: int, rule: str = "") -> None:
        """Count a refusal by ``limit``; log it, at most once a second per limit (and rule)."""
        observer.limit_rejected(limit)
        self._warn((limit, rule), peer, "{limit} ({value}) reached", "by it", limit=limit, value=value, rule=rule)

    def refused_header(self, peer: object, problem: str) -> None:
        """Log a connection the PROXY pre-stage refused, at most once a second."""
        self._warn(("proxy_protocol", ""), peer, "{problem}", "by the PROXY pre-stage", problem=printable(problem))

    def _warn(self, key: tuple[str, str], peer: object, reason: str, by: str, **fields: object) -> None:
        """
        Log ``refusing {peer}: `` and ``reason`` (a log format over
        ``fields``), at most once a second per ``key``; the line says how
        many were refused ``by`` the same since the last one.
        """
        suppressed = self._throttle.admit(key)
        if suppressed is None:
            return
        more = " ({suppressed} more refused " + by + " since the last line)" if suppressed else ""
        log.warn(
            "refusing {peer}: " + reason + more,
            peer=printable(address_text(peer)),
            suppressed=suppressed,
            outcome=Outcome.REJECTED.value,
            **fields,
        )

    def log_end(self, outcome: str, rule: str) -> bool:
        """
        Whether to write a connection's ``connection_end`` line: always, but
        for a refused connection (outcome ``rejected``), whose line is
        written at most once a second per rule; its refusal line, throttled
        too, counts those left out, and the metrics count every one.
        """
        if outcome != Outcome.REJECTED.value:
            return True
        return self._throttle.admit(("connection_end", rule)) is not None
