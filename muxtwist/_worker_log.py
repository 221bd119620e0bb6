"""
A ``--workers`` worker's log, to its parent: each worker writes its
events to its standard output, a pipe the parent reads, and the parent
alone writes them into its one log file
(:func:`muxtwist._textlog.write_log_lines`) and rotates it.
"""

from __future__ import annotations

import atexit
import collections
import io
import os
import threading
import time
from typing import Any

from twisted.logger import formatTime

from muxtwist._twisted import default_reactor

__all__ = ["RECORD_END", "TO_PARENT_ENV", "TO_PARENT_LIMIT", "ToParent"]


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
        # Taken only by a writer that need not wait for it (see _serve).
        self._lock = threading.Lock()
        #: Events written and not yet passed on or held, in order.
        self._queue: collections.deque[bytes] = collections.deque()
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
        self._queue.append(bytes(data).replace(RECORD_END, b"\\x1e") + RECORD_END)
        self._serve()
        return size

    def _serve(self, retry: bool = False, last: bool = False) -> None:
        """
        Pass on the events queued, and what is held (``retry``; ``last``: at
        exit, waiting for the parent, and every write after), unless another
        writer is doing it: then that writer passes this one's events on
        too, after its own.

        No writer ever waits for the lock. Python runs a signal handler in
        the main thread between any two bytecodes, this method's too, and a
        handler may log (Twisted's do): waiting for a lock its own thread
        holds would stop the worker for good, and waiting for one another
        thread holds can close a cycle with a lock of that thread's (Twisted's
        legacy log keeps one). The lock is tried again after its release,
        so an event queued meanwhile is never left behind.
        """
        first = True
        while first or self._queue:
            # At exit, close() waits a little for a writer in another thread.
            if not (self._lock.acquire(timeout=5.0) if last and first else self._lock.acquire(blocking=False)):
                if retry and first:
                    # The writer holding the lock may have taken this retry
                    # for one still to come: one is.
                    self._later()
                return
            try:
                if first:
                    if last and not self._last_writes:
                        self._last_writes = True
                        if self._dropped:
                            self._hold_dropped_note()
                        held = bytes(self._held)
                        self._held.clear()
                        self._send_all(held)
                    elif retry and self._held and not self._pass_on():
                        self._later()
                    first = False
                queue = self._queue
                while queue:
                    self._write(queue.popleft())
            finally:
                self._lock.release()

    def _write(self, record: bytes) -> None:
        """Write one event's record, or hold or drop it (under the lock)."""
        if self._last_writes:
            self._send_all(record)
            return
        if self._held and not self._pass_on():
            if len(self._held) + len(record) > TO_PARENT_LIMIT:
                self._dropped += 1
            else:
                self._held += record
            self._later()
            return
        try:
            sent = os.write(self._fd, record)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the parent is gone: there is nobody to tell
        if sent < len(record):
            self._held += record[sent:]
            self._later()

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
            self._hold_dropped_note()
            return self._pass_on()
        return True

    def _hold_dropped_note(self) -> None:
        """Hold, after what is held, the event that counts the events dropped since the last (under the lock)."""
        dropped, self._dropped = self._dropped, 0
        note = f"{_stamp()} [muxtwist._worker_log#warn] {dropped} log events dropped: "
        note += "the parent process did not read them in time\n"
        self._held += note.encode() + RECORD_END

    def _later(self) -> None:
        """
        Try again soon, from the reactor's thread. Two callers at once (a
        writer under the lock, a retry that could not take it) may both
        schedule one; only the retry scheduled last goes on, so their
        loops never add up while the parent does not read.
        """
        if self._retry is not None:
            return
        reactor = default_reactor(self._reactor)
        self._retry = token = object()
        if threading.current_thread() is threading.main_thread():  # twistd runs its reactor there
            reactor.callLater(_RETRY, self._again, token)
        else:
            reactor.callFromThread(self._again, token)

    def _again(self, token: object) -> None:
        if self._retry is not token:
            return  # another retry is due, scheduled after this one
        self._retry = None
        self._serve(retry=True)

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
        self._serve(last=True)
        atexit.unregister(self.close)
        super().close()


def _stamp() -> str:
    """Now, as the text log's lines begin."""
    return formatTime(time.time())
