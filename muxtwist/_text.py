"""
Values a client chose, made safe for a text log, and log lines that repeat
under load, thinned out.

A PROXY header's UNIX path, a Host header, an SNI name or an ALPN label can
hold any byte: an ESC sequence that repaints an operator's terminal, a
newline that forges a second log line, a right-to-left override that
reorders one. :func:`printable` writes every such character as a Python
escape, so a logged value is one line of plain text whatever the client sent.
"""

from __future__ import annotations

from collections.abc import Hashable

from twisted.internet.interfaces import IReactorTime

__all__ = ["LogThrottle", "printable"]


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
