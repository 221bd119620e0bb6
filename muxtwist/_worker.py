"""
The parent's side of one ``--workers`` worker process
(:class:`muxtwist.workers.WorkerPool` starts them): its log output read
from standard output, whole records only, and from standard error, whole
lines; its end taken at its exit; and the wait, at most
:data:`_OUTPUT_GRACE` seconds, for the rest of its output.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol as _ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from muxtwist._textlog import write_log_lines
from muxtwist._worker_log import RECORD_END

__all__: list[str] = []

log = Logger(namespace="muxtwist.workers")  # as before the move: log filters and greps keep working

#: A worker's log output longer than this without an end of record is written as it is.
_LONGEST_RECORD = 1024 * 1024

#: Seconds a stop waits for the rest of an exited worker's output (its last
#: log lines) when a program it started still holds its pipes.
_OUTPUT_GRACE = 2.0


class _Pool(Protocol):
    """What a worker needs of the pool that started it."""

    _reactor: Any

    def _ended(self, worker: _Worker) -> None:
        """``worker`` exited: replace it, unless the pool is stopping."""


class _Worker(_ProcessProtocol):
    def __init__(self, pool: _Pool, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.started = pool._reactor.seconds()
        #: Fires once the worker exited and its output is read (see processExited).
        self.ended: defer.Deferred[None] = defer.Deferred()
        #: Whether the worker process exited.
        self.exited = False
        self._read_rest: Any = None
        self.pid: int | None = None
        #: The worker's log output after its last whole event (``relay_log``).
        self._partial = b""
        #: Its standard error after its last whole line (``relay_log``).
        self._error = b""

    def outReceived(self, data: bytes) -> None:
        # The worker's log (relay_log): whole events only (each ends in
        # RECORD_END), so that one never interleaves with the parent's own or
        # another worker's, even one of several lines.
        partial = self._partial + data
        end = partial.rfind(RECORD_END) + 1
        if len(partial) - end > _LONGEST_RECORD:
            end = len(partial)
        self._partial = partial[end:]
        if end:
            write_log_lines(partial[:end].replace(RECORD_END, b""))

    def outConnectionLost(self) -> None:
        if self._partial:
            partial, self._partial = self._partial.replace(RECORD_END, b""), b""
            write_log_lines(partial if partial.endswith(b"\n") else partial + b"\n")

    def errReceived(self, data: bytes) -> None:
        # Standard error (relay_log): a traceback, a rules file's error, a
        # warning. What one read brings, in whole lines, is one event, so
        # that a traceback written at once stays together.
        error = self._error + data
        end = error.rfind(b"\n") + 1
        if len(error) - end > _LONGEST_RECORD:
            end = len(error)
        self._error = error[end:]
        if end:
            self._say(error[:end])

    def errConnectionLost(self) -> None:
        if self._error:
            error, self._error = self._error, b""
            self._say(error)

    def _say(self, error: bytes) -> None:
        log.warn(
            "worker {slot} (pid {pid}) wrote to its standard error:\n{text}",
            slot=self.slot,
            pid=self.pid,
            text=error.decode("utf-8", "replace").rstrip("\n"),
        )

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        log.info("worker {slot} started: pid {pid}", slot=self.slot, pid=self.pid)

    def processExited(self, reason: Failure) -> None:
        # At its exit, not once its pipes close too (processEnded): a program
        # it started (a backend a rules file runs) may hold them for long.
        # It is replaced now; `ended` (what a stop waits for) waits for the
        # rest of its output, its last log lines, up to _OUTPUT_GRACE seconds.
        self.exited = True
        self._read_rest = self.pool._reactor.callLater(_OUTPUT_GRACE, self._output_read)
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        if reason.check(ProcessDone):
            log.info("worker {slot} (pid {pid}) exited", slot=self.slot, pid=self.pid)
        else:
            log.warn(
                "worker {slot} (pid {pid}) ended: exit code {code}, signal {signal}",
                slot=self.slot,
                pid=self.pid,
                code=code,
                signal=sig,
            )
        self.pool._ended(self)

    def processEnded(self, reason: Failure) -> None:
        if self._read_rest is not None and self._read_rest.active():
            self._read_rest.cancel()
        self._output_read()

    def _output_read(self) -> None:
        if not self.ended.called:
            self.ended.callback(None)
