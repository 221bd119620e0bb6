"""
The log lines of a :class:`~muxtwist.proxy.Proxy`'s failed connects, and of
the connections no backend could take or its ``max_connections`` refused,
thinned out: a dead backend or a full proxy behind a client's connect loop
would otherwise write a warning or two per connection.

A backend's failures are logged at most once a second, and a rule's
``no backend could take`` and ``max_connections`` lines too (a
:class:`~muxtwist._text.BurstLog`, as for the sniffer's limit refusals). The
first after a quiet second is logged at once, with its client and reason;
the next line let through says how many were left out since the last. When
a burst stops, the count still pending is logged (with the last client and
reason) a second after the first one left out, so the tail of a burst is
never lost or told only with the next failure, hours later; stopping the
proxy logs it at once. Clients are written ``host:port``, escaped. The proxy's counters count
every failure either way.
"""

from __future__ import annotations

from collections.abc import Hashable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from muxtwist._limits import address_text
from muxtwist._text import BurstLog, printable

__all__ = ["FailureLog"]

log = Logger(namespace="muxtwist.proxy")


class _Line:
    """The formats of one kind of line: about one client, its count suffix, and the count alone."""

    __slots__ = ("alone", "more", "one")

    def __init__(self, one: str, more: str, alone: str) -> None:
        self.one, self.more, self.alone = one, more, alone


_FAILED = _Line(
    "rule {rule}: backend {backend} failed for {client}: {kind}: {problem}",
    " ({suppressed} more failures since the last line)",
    "rule {rule}: backend {backend} failed for {suppressed} more clients since the last line"
    " (the last: {client}: {kind}: {problem})",
)
_GAVE_UP = _Line(
    "rule {rule}: no backend could take {client}; closing it",
    " ({suppressed} more closed since the last line)",
    "rule {rule}: no backend could take {suppressed} more clients since the last line"
    " (the last: {client}); closed them",
)

_REFUSED = _Line(
    "rule {rule}: refusing {client}: max_connections ({limit}) reached",
    " ({suppressed} more refused since the last line)",
    "rule {rule}: refused {suppressed} more clients since the last line: max_connections ({limit}) reached"
    " (the last: {client})",
)


class FailureLog:
    """
    A proxy's backend-failure and gave-up lines, at most one a second per
    backend (per rule for gave-up), with the count of those left out.

    :param reactor: the clock (``IReactorTime``).
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self._log: BurstLog[tuple[_Line, dict[str, object]]] = BurstLog(reactor, _tail)

    def connect_failed(self, rule: str, backend: str, client: object, kind: str, problem: str) -> None:
        """A connect to ``backend`` for ``client`` failed: ``kind`` (refused, timeout...) and why."""
        self._line(
            ("backend", backend),
            _FAILED,
            rule=rule,
            backend=printable(backend),
            client=address_text(client),
            kind=kind,
            problem=printable(problem),
        )

    def gave_up(self, rule: str, client: object) -> None:
        """No backend of ``rule`` could take ``client``, which is closed."""
        self._line(("gave_up", rule), _GAVE_UP, rule=rule, client=address_text(client))

    def refused(self, rule: str, client: object, limit: int) -> None:
        """``client`` was refused: the proxy holds ``limit`` relays (its ``max_connections``)."""
        self._line(("refused", rule), _REFUSED, rule=rule, client=address_text(client), limit=limit)

    def flush(self) -> None:
        """Log every count still pending now (the proxy stops), and cancel the timers that would have."""
        self._log.flush()

    def _line(self, key: Hashable, line: _Line, **fields: object) -> None:
        suppressed = self._log.admit(key, (line, fields))
        if suppressed is not None:
            log.warn((line.one + line.more) if suppressed else line.one, suppressed=suppressed, **fields)


def _tail(held: tuple[_Line, dict[str, object]], suppressed: int) -> None:
    line, fields = held
    log.warn(line.alone, suppressed=suppressed, **fields)
