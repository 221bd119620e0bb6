"""
Values a client chose, made safe for a text log, and log lines that repeat
under load, thinned out.

A PROXY header's UNIX path, a Host header, an SNI name or an ALPN label can
hold any byte: an ESC sequence that repaints an operator's terminal, a
newline that forges a second log line, a right-to-left override that
reorders one. :func:`printable` writes every such character as a Python
escape, so a logged value is one line of plain text whatever the client sent.

A connect loop against a full limit, or a flood of spoofed datagrams, would
write a line per client. :class:`LogThrottle` lets at most one line a second
through per key and counts the others; :class:`BurstLog` adds the tail of a
burst: when the lines stop, the count still pending is reported by a timer
(and at once by :meth:`BurstLog.flush`, when its owner stops), so a burst
followed by quiet is logged whole rather than with the next line, hours
later, or never.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["BurstLog", "LogThrottle", "printable"]

T = TypeVar("T")


def _escape(char: str) -> str:
    code = ord(char)
    if char == "\\":
        return "\\\\"
    if 0xDC80 <= code <= 0xDCFF:
        # A byte that was not UTF-8, kept by surrogateescape.
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(value: object) -> str:
    """
    ``value`` as one line of printable text: bytes are read as UTF-8, and
    every character that is not printable (control characters, ESC, DEL,
    line separators, bidirectional overrides, bytes that are not UTF-8) is
    written as a Python escape (``\\x1b``, ``\\u202e``); a backslash is
    doubled, so an escape in the output always stands for one in the input.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value).decode("utf-8", "surrogateescape")
    else:
        text = value if isinstance(value, str) else str(value)
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else _escape(c) for c in text)


class LogThrottle:
    """
    At most one log line per ``interval`` seconds for each key (a limit's
    name, say); the lines in between are counted, and the count is reported
    with the next line that is let through.

    :param reactor: the clock (``IReactorTime``).
    """

    __slots__ = ("_last", "_reactor", "interval")

    def __init__(self, reactor: IReactorTime, interval: float = 1.0) -> None:
        self._reactor = reactor
        self.interval = interval
        self._last: dict[Hashable, list[float]] = {}

    def admit(self, key: Hashable) -> int | None:
        """
        ``None`` if a line for ``key`` should be left out now; otherwise the
        number of lines left out for ``key`` since the last one let through.
        """
        now = self._reactor.seconds()
        entry = self._last.get(key)
        if entry is None:
            self._last[key] = [now, 0]
            return 0
        if now - entry[0] >= self.interval:
            suppressed = int(entry[1])
            entry[0], entry[1] = now, 0
            return suppressed
        entry[1] += 1
        return None

    def flush(self, key: Hashable) -> int | None:
        """
        ``None`` if no line for ``key`` was left out since the last one let
        through; otherwise how many were, now reported: the count starts
        again from 0, and the next line for ``key`` waits ``interval`` from
        now, as after a line let through. For a caller that reports a
        burst's count once the burst stops (with a timer of its own).
        """
        entry = self._last.get(key)
        if entry is None or not entry[1]:
            return None
        suppressed = int(entry[1])
        entry[0], entry[1] = self._reactor.seconds(), 0
        return suppressed


class BurstLog(Generic[T]):
    """
    A :class:`LogThrottle` that also reports a burst's tail: at most one line
    per ``interval`` for each key, and every line left out is counted once,
    either by the next line let through (:meth:`admit` returns the count) or,
    when no line follows, by ``tail(held, count)``, called by a one-shot
    timer ``interval`` after the first line left out, with what was given
    for the last one left out. After a tail the next line for the key waits
    ``interval``, as after any line.

    :meth:`flush` (its owner stops) reports every pending count at once and
    cancels the timers; none is pending once the key has been quiet for
    ``interval``.

    :param reactor: the clock (``IReactorTime``).
    :param tail: writes the line for ``count`` lines left out, the last of
        which was given ``held``.
    """

    __slots__ = ("_held", "_reactor", "_tail", "_throttle", "_timers")

    def __init__(self, reactor: IReactorTime, tail: Callable[[T, int], object], interval: float = 1.0) -> None:
        self._reactor = reactor
        self._tail = tail
        self._throttle = LogThrottle(reactor, interval)
        #: what was given with the last line left out for each key, and the timer that reports its count.
        self._held: dict[Hashable, T] = {}
        self._timers: dict[Hashable, IDelayedCall] = {}

    @property
    def interval(self) -> float:
        """Seconds between two lines for one key."""
        return self._throttle.interval

    @property
    def pending(self) -> int:
        """How many keys have a count that a timer will report."""
        return len(self._timers)

    def admit(self, key: Hashable, held: T) -> int | None:
        """
        ``None`` if the line for ``key`` is left out now (``held`` is kept
        for the tail line, should no line follow); otherwise the number of
        lines left out for ``key`` since the last line, which this one is
        to report.
        """
        suppressed = self._throttle.admit(key)
        if suppressed is None:
            self._held[key] = held
            if key not in self._timers:
                self._timers[key] = self._reactor.callLater(self._throttle.interval, self._due, key)
            return None
        if key in self._timers:
            # This line carries the count; the timer has nothing left to say.
            self._timers.pop(key).cancel()
            del self._held[key]
        return suppressed

    def flush(self) -> None:
        """Report every count still pending now, and cancel the timers that would have."""
        for key in list(self._timers):
            self._timers.pop(key).cancel()
            self._report(key)

    def _due(self, key: Hashable) -> None:
        del self._timers[key]
        self._report(key)

    def _report(self, key: Hashable) -> None:
        held = self._held.pop(key)
        suppressed = self._throttle.flush(key)
        if suppressed:
            self._tail(held, suppressed)
