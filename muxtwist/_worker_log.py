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
#: it are dropped, and counted in a line once the parent reads again. (The
#: buffer drops what went only once more than half of it has, so its memory
#: may reach twice this.)
TO_PARENT_LIMIT = 4 * 1024 * 1024

#: How often a worker tries again to pass on the lines its parent did not read.
_RETRY = 0.05

#: How late a retry may run before it is taken as lost (an exception raised
#: as it started) and another is scheduled.
_RETRY_LOST = 1.0

#: The most one write to the parent is given (a pipe holds 64 KiB by default).
_CHUNK = 64 * 1024


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
        #: What the parent did not take yet (held), in order; its first bytes
        #: the rest of a record a write cut short, written before anything else.
        self._unsent = _Unsent()
        self._dropped = 0
        self._retry: Any = None
        self._retry_due = 0.0
        #: The reactor's call of the retry due, when scheduled from its thread.
        self._retry_call: Any = None
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
        try:
            self._queue.append(record)
            self._serve()
        except BaseException:
            self._later()  # what an exception left queued or unsent goes on without another event
            raise
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

        A handler may also raise (SIGINT's raises KeyboardInterrupt), as
        soon as any call returns: the lock is taken and noted in one step,
        and released whatever is raised after; a record leaves the queue in
        the same step as it joins what is unsent; and a write and its count
        are one step too (:meth:`_pass_on`). So an exception costs no
        event, cuts none, and never leaves the lock taken.
        """
        first = True
        while first or self._queue:
            wait = last and first  # at exit, close() waits a little for a writer in another thread
            taken: collections.deque[bool] = collections.deque()
            try:
                # acquire() and the append, in C: nothing runs between them.
                taken.extend(map(self._lock.acquire, (wait,), (5.0 if wait else -1,)))
                if not taken[0]:
                    if retry and first:
                        # The writer holding the lock may have taken this retry
                        # for one still to come: one is.
                        self._later()
                    return
                if first:
                    if last and not self._last_writes:
                        self._last_writes = True
                        try:
                            os.set_blocking(self._fd, True)
                        except OSError:
                            pass  # closed: the parent is gone
                        if self._dropped:
                            self._hold_dropped_note()
                        self._pass_on()
                    elif retry and (self._unsent or self._dropped) and not self._pass_on():
                        self._later()
                    first = False
                while self._queue:
                    self._write_first()
            finally:
                if taken and taken[0]:
                    self._lock.release()

    def _write_first(self) -> None:
        """Write the first event queued, after what is held, or hold or drop it (under the lock)."""
        queue = self._queue
        full = bool(self._unsent.data) and not self._pass_on()
        unsent = self._unsent
        if full and len(unsent) + len(queue[0]) > TO_PARENT_LIMIT:
            self._dropped += 1
        else:
            # No call between the two: no exception can come between them either.
            unsent.data += queue[0]
        queue.popleft()
        if full or not self._pass_on():
            self._later()

    def _pass_on(self) -> bool:
        """Write what is unsent, as much as the pipe takes; whether all of it went (under the lock)."""
        while True:
            unsent = self._unsent
            try:
                start = unsent.sent
                while start < len(unsent.data):
                    # os.write() and the append of what it took, in C: a
                    # signal handler's exception, raised once a call returns,
                    # comes after both, never between.
                    unsent.written.extend(map(os.write, (self._fd,), (unsent.data[start : start + _CHUNK],)))
                    start += unsent.written[-1]
            except BlockingIOError:
                return False
            except OSError:
                self._unsent = _Unsent()  # the parent is gone: there is nobody to tell
                self._dropped = 0
                return True
            finally:
                self._let_go()
            if not self._dropped:
                return True
            self._hold_dropped_note()

    def _let_go(self) -> None:
        """
        Let go of what went (under the lock): in one assignment, so that an
        exception may leave it for later but never half done.
        """
        unsent = self._unsent
        start = unsent.sent
        if start == len(unsent.data):
            if start:
                self._unsent = _Unsent()
        elif start > len(unsent.data) // 2:  # a copy of at most as much as went since the last
            self._unsent = _Unsent(unsent.data[start:])

    def _hold_dropped_note(self) -> None:
        """Hold, after what is held, the event that counts the events dropped since the last (under the lock)."""
        note = f"{_stamp()} [muxtwist._worker_log#warn] {self._dropped} log events dropped: "
        note += "the parent process did not read them in time\n"
        record = note.encode() + RECORD_END
        # No call between the two: an exception leaves both or neither done.
        self._unsent.data += record
        self._dropped = 0

    def _later(self) -> None:
        """
        Try again soon, from the reactor's thread. Two callers at once (a
        writer under the lock, a retry that could not take it) may both
        schedule one; only the retry scheduled last goes on, so their
        loops never add up while the parent does not read. An exception
        while scheduling one leaves none due: the next caller schedules
        one, and one scheduled all the same goes on. One that started
        without going on (an exception raised as it started: the event the
        reactor logs of it comes here at once), or did not run
        :data:`_RETRY_LOST` seconds after it was due, is taken as lost.
        """
        reactor = default_reactor(self._reactor)
        started = getattr(self._retry_call, "called", False)
        if self._retry is not None and not started and reactor.seconds() < self._retry_due:
            return
        self._retry = token = object()
        self._retry_call = None
        self._retry_due = reactor.seconds() + _RETRY + _RETRY_LOST
        try:
            if threading.current_thread() is threading.main_thread():  # twistd runs its reactor there
                self._retry_call = reactor.callLater(_RETRY, self._again, token)
            else:
                reactor.callFromThread(self._again, token)
        except BaseException:
            self._retry = None
            raise

    def _again(self, token: object) -> None:
        if self._retry is not token and self._retry is not None:
            return  # another retry is due, scheduled after this one
        self._retry = None
        try:
            self._serve(retry=True)
        except BaseException:
            self._later()
            raise

    def close(self) -> None:
        """At exit: what is held, and the count of what was dropped, go to the parent, waiting for it."""
        self._serve(last=True)
        atexit.unregister(self.close)
        super().close()


class _Unsent:
    """
    What a worker has yet to pass on to its parent, in order: ``data`` but
    its first ``sent`` bytes, which went. What went is let go of by
    replacing the whole, never by editing it, so that no exception leaves
    the two disagreeing.
    """

    __slots__ = ("data", "written")

    def __init__(self, data: bytes | bytearray = b"") -> None:
        self.data = bytearray(data)
        #: What each write of ``data`` took, from its start on.
        self.written: collections.deque[int] = collections.deque()

    @property
    def sent(self) -> int:
        """How many bytes of ``data`` went."""
        return sum(self.written)

    def __len__(self) -> int:
        return len(self.data) - self.sent


def _stamp() -> str:
    """Now, as the text log's lines begin."""
    return formatTime(time.time())
