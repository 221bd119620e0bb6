"""
twistd's text log, written faster: the lines Twisted's own text observer
writes, for less of the process's time.

Every connection writes one ``connection_end`` line, so on workloads of
short connections the log line is a large part of a connection's cost.
Twisted's text observer formats each event's timestamp anew (three
timezone lookups and a ``strftime``) and each field of a ``log_format``
with :class:`string.Formatter`, in Python. :class:`ClassicText` formats the
same line with the timestamp computed once a second, and the
``connection_end`` format with one f-string over the event's fields (so
an observer that rewrote a field before, one masking ``peer`` say, still
has its way); any other event, and any it cannot format so, goes through
Twisted's :func:`~twisted.logger.formatEventAsClassicLogText` with that
timestamp. The text is Twisted's to the byte, but for fields whose
formatting has side effects: a field the f-string refuses is formatted
again, by Twisted.

:func:`text_log_observer` is what ``twistd muxtwist`` logs to (``--logger``
for twistd, set by the ``muxtwist`` command's options): the file twistd
itself would open for the same options, with this formatting. The workers
of ``--workers N`` log to their standard output, a pipe their parent reads
(:class:`muxtwist._worker_log.ToParent`): :func:`write_log_lines` puts
their lines in the parent's file.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

from twisted.logger import FileLogObserver, ILogObserver, LogEvent, Logger, formatEventAsClassicLogText, formatTime
from twisted.python import logfile

from muxtwist._report import CONNECTION_END
from muxtwist._twisted import default_reactor
from muxtwist._worker_log import TO_PARENT_ENV, ToParent

__all__ = [
    "ClassicText",
    "text_log_observer",
    "use_twistd_options",
    "write_log_lines",
]

_log = Logger()


class ClassicText:
    """
    :func:`~twisted.logger.formatEventAsClassicLogText` with twistd's
    default time format, computed once per second of log time.
    """

    __slots__ = ("_second", "_stamp")

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = ""

    def _time(self, when: float | None) -> str:
        if type(when) is not float and type(when) is not int:
            return formatTime(when)  # None ("-"), or whatever else Twisted makes of it
        # The second Twisted prints: datetime rounds the time to microseconds
        # (half to even) first, so 0.9999996 s into a second is the next one.
        second = math.floor(when)
        if round((when - second) * 1e6) >= 1_000_000:
            second += 1
        if second != self._second:
            # The format has no fraction of a second: one string serves the whole second.
            self._stamp = formatTime(second)
            self._second = second
        return self._stamp

    def __call__(self, event: LogEvent) -> str | None:
        template = event.get("log_format")
        if type(template) is str and template == CONNECTION_END and "log_failure" not in event:
            text = self._connection_end(event)
            if text is not None:
                return text
        return formatEventAsClassicLogText(event, formatTime=self._time)

    def _connection_end(self, event: LogEvent) -> str | None:
        """
        The ``connection_end`` line, as Twisted's ``formatEvent`` and
        ``eventAsText`` would make it; ``None`` for an event they format
        otherwise (flattened, or a field the format refuses).
        """
        if "log_flattened" in event:
            return None
        try:
            # CONNECTION_END, as string.Formatter would fill it in from these fields.
            text = (
                f"connection {event['peer']} -> port {event['local_port']} ended: {event['outcome']}, "
                f"rule {event['rule']}, sniffed {event['sniff_time']:.4f}s, {event['bytes_in']} bytes in / "
                f"{event['bytes_out']} out while sniffing, {event['duration']:.3f}s{event['how']}"
            )
        except BaseException:
            # Twisted says so in its own words (formatting the fields again).
            return None
        stamp = self._time(event.get("log_time"))  # before the system, as Twisted does
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        else:
            try:
                system = str(system)
            except Exception:
                system = "UNFORMATTABLE"
        text = f"{stamp} [{system}] {text}"
        return text.replace("\n", "\n\t") + "\n"


#: Where twistd was told to log (``--logfile``, ``--nodaemon``), for
#: :func:`text_log_observer`: twistd calls a ``--logger`` factory with no
#: arguments, so the ``muxtwist`` command's options leave them here.
_twistd_options: dict[str, Any] = {}


def use_twistd_options(options: Mapping[str, Any]) -> None:
    """
    Have :func:`text_log_observer` log where twistd's ``options`` say, as
    they are now: twistd's own logger reads them when it is made, before
    ``--debug`` implies ``--nodaemon``, and so does this.
    """
    global _twistd_options
    _twistd_options = {"logfile": options.get("logfile"), "nodaemon": bool(options.get("nodaemon"))}


#: The file the observer of :func:`text_log_observer` writes, once twistd made it.
_log_file: Any = None


def write_log_lines(data: bytes) -> None:
    """
    Write ``data``, whole lines already formatted (a worker's), to the file
    of twistd's text log, rotated with it; standard output before twistd
    starts logging. A file that cannot be written loses the lines, as a
    full disk loses the process's own.
    """
    out: Any = _log_file if _log_file is not None else sys.stdout
    try:
        out.write(data if isinstance(out, logfile.LogFile) else data.decode("utf-8", "replace"))
        out.flush()
    except OSError:
        pass


def text_log_observer() -> ILogObserver:
    """
    The file twistd would log to for its options, in twistd's text format:
    standard output for ``-l -`` and for ``-n`` without ``-l``, else
    ``--logfile`` (``twistd.log`` by default), rotated on ``SIGUSR1`` as
    twistd does when nothing else handles that signal.
    """
    options = _twistd_options
    name = options.get("logfile")
    nodaemon = bool(options.get("nodaemon"))
    out: Any
    if name == "-":
        if not nodaemon:
            sys.exit("Daemons cannot log to stdout, exiting!")
        out = sys.stdout
    elif nodaemon and not name:
        out = ToParent() if os.environ.pop(TO_PARENT_ENV, None) == "1" else sys.stdout
    else:
        out = logfile.LogFile.fromFullPath(name or "twistd.log")
        usr1 = getattr(signal, "SIGUSR1", None)
        if usr1 is not None and not signal.getsignal(usr1):

            def rotate(signum: int, frame: object) -> None:
                default_reactor(None).callFromThread(out.rotate)

            signal.signal(usr1, rotate)
    global _log_file
    _log_file = out
    return FileLogObserver(out, ClassicText())
