"""
Tests for :mod:`muxtwist._worker_log`: a ``--workers`` worker's log, to its
parent, through a pipe, when an exception cuts a write short.
"""

from __future__ import annotations

import fcntl
import os
import sys
from types import FrameType
from typing import Any

from twisted.internet.task import Clock
from twisted.trial import unittest

from muxtwist import _worker_log
from muxtwist._worker_log import RECORD_END, ToParent


class _FromAHandler(Exception):
    """What a signal handler raises in the thread writing (as Python's SIGINT handler raises KeyboardInterrupt)."""


#: The pipe's size: four pages. A first record of three pages leaves the next
#: one room for one page only, so its write is cut short (Linux writes whole pages).
_PIPE = 16384
_FIRST = b"f" * (3 * 4096 - 2) + b"\n"
_CUT = b"c" * (10000 - 2) + b"\n"
_AFTER = [b"after one\n", b"after two\n"]


class ExceptionMidWriteTests(unittest.TestCase):
    """
    Python runs a signal handler, which may raise, once a call returns: after
    ``os.write`` and before the worker notes what the write took, as much as
    anywhere else.
    """

    def _write_interrupted(self, point: int) -> tuple[bool, bytes]:
        """
        Write a record the pipe takes part of, raising at the ``point``-th
        place a handler could (a call made or returned in ``_worker_log``)
        once the record is queued, then two more, the parent reading:
        whether it was raised, and what the parent read.
        """
        clock = Clock()
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)
        fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), _PIPE)
        os.set_blocking(read_end, False)
        out = ToParent(write_end, reactor=clock)
        self.addCleanup(out.close)
        out.write(_FIRST)
        places, queued = 0, False

        def handler(frame: FrameType, event: str, arg: Any) -> None:
            nonlocal places, queued
            if not queued:
                # Before, the record is the caller's, not yet the log's, to lose.
                queued = event == "c_return" and getattr(arg, "__self__", None) is out._queue
            elif event in ("call", "return", "c_return") and frame.f_code.co_filename == _worker_log.__file__:
                places += 1
                if places > point:
                    raise _FromAHandler(point)

        before = sys.getprofile()
        raised = False
        sys.setprofile(handler)
        try:
            out.write(_CUT)
        except _FromAHandler:
            raised = True
        finally:
            sys.setprofile(before)
        for line in _AFTER:
            out.write(line)
        received = b""
        for _ in range(20):  # the parent reads; retries pass on what is left
            received += _read_all(read_end)
            clock.advance(0.05)
        return raised, received

    def test_a_record_cut_short_by_an_exception_is_completed_before_the_next(self) -> None:
        """
        Whichever place after a write cut short an exception comes from,
        the parent reads every record whole and in order: the rest of the
        cut one first, never the next glued to its start.
        """
        from muxtwist import _worker, workers

        expected = [_FIRST, _CUT, *_AFTER]
        for point in range(500):
            raised, received = self._write_interrupted(point)
            self.assertEqual(received.split(RECORD_END), [*expected, b""], f"raised at place {point}")
            lines: list[bytes] = []
            self.patch(_worker, "write_log_lines", lines.append)
            parent = _worker._Worker(workers.WorkerPool(1, [], [], handle_signals=False), 0)
            for cut in range(0, len(received), 4096):
                parent.outReceived(received[cut : cut + 4096])
            self.assertEqual(b"".join(lines).splitlines(keepends=True), expected, f"raised at place {point}")
            if not raised:
                break
        else:
            self.fail("the write went on raising after 500 places")
        self.assertGreater(point, 5, "too few places to raise at: the handler was not called")


def _read_all(read_end: int) -> bytes:
    """What the pipe holds now."""
    received = b""
    try:
        while chunk := os.read(read_end, 1 << 16):
            received += chunk
    except BlockingIOError:
        pass
    return received
