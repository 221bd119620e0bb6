"""
Connection limits of the sniffer and the accounting behind them: connections
per source host (``max_connections_per_source``), and refusals, which are
reported to the connection observer and logged at most once a second per
limit and rule (as are PROXY pre-stage refusals and the ``connection_end``
lines of refused connections, so a connect loop cannot flood the log). The
count of a burst's refusals left out is logged with the next refusal line,
or on its own within a second of the burst's end (at once when the listener
stops).
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from muxtwist._rules import Outcome
from muxtwist._text import BurstLog, LogThrottle, printable
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
    """
    Connections closed at once by a limit: told to the observer, logged
    throttled (a :class:`~muxtwist._text.BurstLog`): a burst's count goes
    with the next line, or in a line of its own when the burst stops.
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self._log: BurstLog[tuple[str, dict[str, object]]] = BurstLog(reactor, _tail)
        # connection_end lines of refused connections: counted by the refusal lines, never told apart.
        self._ends = LogThrottle(reactor)
        # Connections a rule's factory built no protocol for (a full TerminateTLS or Proxy, which say why).
        self._declined: BurstLog[dict[str, object]] = BurstLog(reactor, _declined_tail)

    def refused(self, observer: IConnectionObserver, peer: object, limit: str, value: int, rule: str = "") -> None:
        """Count a refusal by ``limit``; log it, at most once a second per limit (and rule)."""
        observer.limit_rejected(limit)
        self._warn((limit, rule), peer, _LIMIT, limit=limit, value=value, rule=rule)

    def refused_header(self, peer: object, problem: str) -> None:
        """Log a connection the PROXY pre-stage refused, at most once a second."""
        self._warn(("proxy_protocol", ""), peer, _HEADER, problem=printable(problem))

    def declined(self, peer: object, rule: str) -> None:
        """Log a connection ``rule``'s factory built no protocol for, at most once a second per rule."""
        fields: dict[str, object] = {"rule": rule, "peer": address_text(peer)}
        suppressed = self._declined.admit(rule, fields)
        if suppressed is not None:
            more = " ({suppressed} more declined since the last line)" if suppressed else ""
            log.info("{rule} declined {peer}: its factory built no protocol" + more, suppressed=suppressed, **fields)

    def flush(self) -> None:
        """Log every count still pending now (the listener stops), and cancel the timers that would have."""
        self._log.flush()
        self._declined.flush()

    def _warn(self, key: tuple[str, str], peer: object, line: tuple[str, str, str], **fields: object) -> None:
        """
        Log ``refusing {peer}: `` and ``line``'s reason (a log format over
        ``fields``), at most once a second per ``key``; the line says how
        many were refused the same way since the last one.
        """
        fields.update(peer=address_text(peer), outcome=Outcome.REJECTED.value)
        suppressed = self._log.admit(key, (line[2], fields))
        if suppressed is None:
            return
        log.warn("refusing {peer}: " + line[0] + (line[1] if suppressed else ""), suppressed=suppressed, **fields)

    def log_end(self, outcome: str, rule: str) -> bool:
        """
        Whether to write a connection's ``connection_end`` line: always, but
        for a refused connection (outcome ``rejected``), whose line is
        written at most once a second per rule; its refusal line, throttled
        too, counts those left out, and the metrics count every one.
        """
        if outcome != Outcome.REJECTED.value:
            return True
        return self._ends.admit(("connection_end", rule)) is not None


#: a refusal's reason, the count the next line adds, and the line of a burst's tail.
_LIMIT = (
    "{limit} ({value}) reached",
    " ({suppressed} more refused by it since the last line)",
    "refused {suppressed} more clients since the last line: {limit} ({value}) reached (the last: {peer})",
)
_HEADER = (
    "{problem}",
    " ({suppressed} more refused by the PROXY pre-stage since the last line)",
    "refused {suppressed} more clients by the PROXY pre-stage since the last line (the last: {peer}: {problem})",
)


def _tail(held: tuple[str, dict[str, object]], suppressed: int) -> None:
    line, fields = held
    log.warn(line, suppressed=suppressed, **fields)


def _declined_tail(fields: dict[str, object], suppressed: int) -> None:
    log.info(
        "{rule} declined {suppressed} more clients since the last line: its factory built no protocol"
        " (the last: {peer})",
        suppressed=suppressed,
        **fields,
    )
