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
(:class:`ToParent`): :func:`write_log_lines` puts their lines in the
parent's file.
"""

from __future__ import annotations

import atexit
import io
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from twisted.logger import FileLogObserver, ILogObserver, LogEvent, Logger, formatEventAsClassicLogText, formatTime
from twisted.python import logfile

from muxtwist._report import CONNECTION_END
from muxtwist._twisted import default_reactor

__all__ = [
    "RECORD_END",
    "TO_PARENT_ENV",
    "ClassicText",
    "ToParent",
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

#: Set by a ``--workers`` parent in each worker's environment: log to the
#: parent through standard output, one record per event (:class:`ToParent`).
TO_PARENT_ENV = "MUXTWIST_LOG_TO_PARENT"

#: What ends each event's text on the pipe from a worker to its parent, so
#: that an event of several lines (a traceback) is written whole. Text from
#: clients never holds it: control characters are escaped.
RECORD_END = b"\x1e"

#: The most a worker holds of lines its parent has not read yet; lines past
#: it are dropped, and counted in a line once the parent reads again.
TO_PARENT_LIMIT = 4 * 1024 * 1024

#: How often a worker tries again to pass on the lines its parent did not read.
_RETRY = 0.05


class ToParent(io.RawIOBase):
    """
    A worker's log, to its parent through standard output: each event one
    record ending in :data:`RECORD_END` (one inside an event is written
    ``\\x1e``). Never blocks the worker: a parent that stops reading
    (stopped, or busy) costs held events, up to :data:`TO_PARENT_LIMIT`,
    then dropped ones, counted in an event once they can be passed on again;
    never a stalled service. Held events go out with the next event written,
    or within :data:`_RETRY` seconds. Safe to write from any thread (WSGI
    applications log from theirs). The worker's own descriptor 1 stays as it
    is (its children may write to it): this writes through a non-blocking
    descriptor of the same pipe (without ``/proc``, the descriptor itself is
    made non-blocking).
    """

    def __init__(self, fd: int = 1, reactor: Any = None) -> None:
        super().__init__()
        self._reactor = reactor
        try:
            self._fd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self._fd = os.dup(fd)
            os.set_blocking(self._fd, False)
        self._lock = threading.Lock()
        self._held = bytearray()
        self._dropped = 0
        self._retry: Any = None
        #: At exit: every write waits for the parent (nothing is left to retry later).
        self._last_writes = False
        atexit.register(self.close)

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        pass  # nothing is buffered but what the parent did not read

    def write(self, data: Any) -> int:
        size = len(data)
        record = bytes(data).replace(RECORD_END, b"\\x1e") + RECORD_END
        with self._lock:
            if self._last_writes:
                self._send_all(record)
                return size
            if self._held and not self._pass_on():
                if len(self._held) + len(record) > TO_PARENT_LIMIT:
                    self._dropped += 1
                else:
                    self._held += record
                return size
            try:
                sent = os.write(self._fd, record)
            except BlockingIOError:
                sent = 0
            except OSError:
                return size  # the parent is gone: there is nobody to tell
            if sent < len(record):
                self._held += record[sent:]
                self._later()
        return size

    def _pass_on(self) -> bool:
        """Write what is held, as much as the pipe takes; whether all of it went (under the lock)."""
        try:
            sent = os.write(self._fd, self._held)
        except BlockingIOError:
            return False
        except OSError:
            self._held.clear()
            return True
        del self._held[:sent]
        if self._held:
            return False
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            note = f"{_stamp()} [muxtwist._textlog#warn] {dropped} log events dropped: "
            note += "the parent process did not read them in time\n"
            self._held += note.encode() + RECORD_END
            return self._pass_on()
        return True

    def _later(self) -> None:
        """Try again soon, from the reactor's thread (under the lock)."""
        if self._retry is not None:
            return
        reactor = default_reactor(self._reactor)
        self._retry = True
        if threading.current_thread() is threading.main_thread():  # twistd runs its reactor there
            self._retry = reactor.callLater(_RETRY, self._again)
        else:
            reactor.callFromThread(self._later_from_thread)

    def _later_from_thread(self) -> None:
        with self._lock:
            self._retry = None
            if self._held and not self._pass_on():
                self._later()

    def _again(self) -> None:
        with self._lock:
            self._retry = None
            if self._held and not self._pass_on():
                self._later()

    def _send_all(self, data: bytes) -> None:
        """Write ``data`` whole, waiting for the parent: at exit only."""
        view = memoryview(data)
        try:
            os.set_blocking(self._fd, True)
            while view:
                try:
                    view = view[os.write(self._fd, view) :]
                except InterruptedError:
                    continue
        except OSError:
            pass  # the parent is gone

    def close(self) -> None:
        """At exit: what is held, and the count of what was dropped, go to the parent, waiting for it."""
        with self._lock:
            if not self._last_writes:
                self._last_writes = True
                if self._dropped:
                    dropped, self._dropped = self._dropped, 0
                    note = f"{_stamp()} [muxtwist._textlog#warn] {dropped} log events dropped: "
                    note += "the parent process did not read them in time\n"
                    self._held += note.encode() + RECORD_END
                if self._held:
                    self._send_all(bytes(self._held))
                    self._held.clear()
        atexit.unregister(self.close)
        super().close()


def _stamp() -> str:
    """Now, as the text log's lines begin."""
    return formatTime(time.time())


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
