"""
Tests for muxtwist._text: client-chosen values made safe for a text log, and
the log throttle.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.trial import unittest

from muxtwist._text import LogThrottle, printable


class PrintableTests(unittest.TestCase):
    def test_plain_text_unchanged(self) -> None:
        """Printable text, including non-ASCII letters, is returned as it is."""
        self.assertEqual(printable("api.example.com"), "api.example.com")
        self.assertEqual(printable("café.test"), "café.test")

    def test_control_characters_escaped(self) -> None:
        """ESC, newlines, DEL, C1 controls and bidirectional overrides become escapes on one line."""
        self.assertEqual(printable("a\x1b[31mb\nc\x7f\x85\u202e"), "a\\x1b[31mb\\x0ac\\x7f\\x85\\u202e")

    def test_bytes_read_as_utf8_and_others_escaped(self) -> None:
        """Bytes are read as UTF-8; bytes that are not UTF-8 are written as \\xNN."""
        self.assertEqual(printable(b"/run/\xc3\xa9\xff\x00"), "/run/é\\xff\\x00")

    def test_backslash_doubled(self) -> None:
        """A backslash the client sent is doubled, so it cannot pass for an escape."""
        self.assertEqual(printable("a\\x1b"), "a\\\\x1b")

    def test_other_objects_by_str(self) -> None:
        """Anything else is escaped by its str()."""
        self.assertEqual(printable(42), "42")


class LogThrottleTests(unittest.TestCase):
    def test_one_line_per_interval_per_key_with_the_count_left_out(self) -> None:
        """Lines for one key pass once per interval, the next one carrying how many were left out; keys are apart."""
        clock = task.Clock()
        throttle = LogThrottle(clock, interval=1.0)
        self.assertEqual(throttle.admit("a"), 0)
        self.assertEqual([throttle.admit("a") for _ in range(5)], [None] * 5)
        self.assertEqual(throttle.admit("b"), 0)
        clock.advance(1.0)
        self.assertEqual(throttle.admit("a"), 5)
        self.assertIsNone(throttle.admit("a"))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_flush_reports_the_count_left_out_and_starts_the_interval_again(self) -> None:
        """flush returns how many lines were left out (None if none), and the next line waits an interval."""
        clock = task.Clock()
        throttle = LogThrottle(clock, interval=1.0)
        self.assertIsNone(throttle.flush("a"))
        self.assertEqual(throttle.admit("a"), 0)
        self.assertIsNone(throttle.flush("a"))
        self.assertEqual([throttle.admit("a") for _ in range(3)], [None] * 3)
        clock.advance(1.5)
        self.assertEqual(throttle.flush("a"), 3)
        self.assertIsNone(throttle.flush("a"))
        clock.advance(0.5)
        self.assertIsNone(throttle.admit("a"))
        clock.advance(0.5)
        self.assertEqual(throttle.admit("a"), 1)
