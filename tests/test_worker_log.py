"""
Tests for :mod:`muxtwist._worker_log`: a ``--workers`` worker's log, to its
parent, through a pipe, when an exception cuts a write short.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

from twisted.internet.task import Clock
from twisted.trial import unittest

from muxtwist import _worker_log
from muxtwist._worker_log import RECORD_END, ToParent
from tests.test_textlog import _pipe_to_parent, _read_all


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

    def _write_interrupted(self, point: int, after: list[bytes] = _AFTER) -> tuple[bool, bytes]:
        """
        Write a record the pipe takes part of, raising at the ``point``-th
        place a handler could (a call made or returned in ``_worker_log``)
        once the record is queued, then those ``after``, the parent reading:
        whether it was raised, and what the parent read.
        """
        clock = Clock()
        read_end, out = _pipe_to_parent(self, clock, _PIPE)
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
        for line in after:
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

    def test_what_an_exception_leaves_unsent_goes_out_without_another_event(self) -> None:
        """
        Whichever place after a write cut short an exception comes from, a
        worker that logs nothing more still passes the rest on by retries.
        """
        for point in range(500):
            raised, received = self._write_interrupted(point, after=[])
            self.assertEqual(received.split(RECORD_END), [_FIRST, _CUT, b""], f"raised at place {point}")
            if not raised:
                break
        self.assertGreater(point, 5, "too few places to raise at: the handler was not called")

    def _retry_ended_as_it_starts(self, clock: Clock, out: ToParent) -> bytes:
        """Three records past the pipe's 4 KiB (the rest held, a retry due), then that retry raises as it starts."""
        big = b"x" * 3000 + b"\n"
        for _ in range(3):
            out.write(big)

        def handler(frame: FrameType, event: str, arg: Any) -> None:
            if event == "call" and frame.f_code.co_name == "_again":
                raise _FromAHandler()

        before = sys.getprofile()
        sys.setprofile(handler)
        try:
            self.assertRaises(_FromAHandler, clock.advance, 0.05)
        finally:
            sys.setprofile(before)
        return big

    def test_a_retry_an_exception_ends_as_it_starts_leaves_retries_going(self) -> None:
        """An exception raised as a retry starts does not stop later retries: held events go out by retries alone."""
        clock = Clock()
        read_end, out = _pipe_to_parent(self, clock, 4096)
        big = self._retry_ended_as_it_starts(clock, out)
        clock.advance(1.0)
        out.write(b"after\n")  # the pipe still full: held, a retry due
        received = b""
        for _ in range(40):  # the parent reads; nothing is written but by retries
            received += _read_all(read_end)
            clock.advance(0.05)
        self.assertEqual(received.split(RECORD_END), [big] * 3 + [b"after\n", b""])

    def test_a_retry_lost_as_it_starts_is_replaced_by_the_event_logging_its_failure(self) -> None:
        """
        The event the reactor logs for a retry an exception ended as it
        started (written at once, the pipe still full) schedules the next
        retry: a worker quiet after it passes everything on within a second.
        """
        clock = Clock()
        read_end, out = _pipe_to_parent(self, clock, 4096)
        big = self._retry_ended_as_it_starts(clock, out)
        out.write(b"Unhandled error in timed call\n")  # what Twisted logs of it, at once
        received = b""
        for _ in range(18):  # 0.9 s: the parent reads; nothing is written but by retries
            received += _read_all(read_end)
            clock.advance(0.05)
        received += _read_all(read_end)
        expected = [big] * 3 + [b"Unhandled error in timed call\n", b""]
        self.assertTrue(received.split(RECORD_END) == expected, f"{received.count(RECORD_END)} of 4 records went")
        for _ in range(40):  # no retry is left once all went
            clock.advance(0.05)
        self.assertEqual(clock.getDelayedCalls(), [])


class DroppedNoteTests(unittest.TestCase):
    def test_an_exception_while_the_dropped_note_is_made_keeps_the_count(self) -> None:
        """An exception raised while the note counting dropped events is made leaves the count to the next note."""
        self.patch(_worker_log, "TO_PARENT_LIMIT", 8192)
        clock = Clock()
        read_end, out = _pipe_to_parent(self, clock, 4096)
        line = b"x" * 99 + b"\n"
        for _ in range(300):  # the pipe's 4 KiB, 8 KiB held, the rest dropped
            out.write(line)
        self.assertGreater(out._dropped, 0)
        real, raised = _worker_log._stamp, []

        def stamp() -> str:
            if not raised:
                raised.append(True)
                raise _FromAHandler()  # a handler's, while the note is made
            return real()

        self.patch(_worker_log, "_stamp", stamp)
        received = b""
        for _ in range(40):  # the parent reads; nothing is written but by retries
            received += _read_all(read_end)
            try:
                clock.advance(0.05)
            except _FromAHandler:
                pass
        self.assertEqual(raised, [True])
        records = received.split(RECORD_END)
        self.assertEqual(records.pop(), b"")
        notes = [r for r in records if b"log events dropped" in r]
        dropped = sum(int(n.split(b"] ")[1].split(b" ")[0]) for n in notes)
        self.assertEqual(records.count(line) + dropped, 300, notes)
