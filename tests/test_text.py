"""
Tests for muxtwist._text: client-chosen values made safe for a text log, and
the log throttle and the burst log built on it.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from twisted.internet import task
from twisted.trial import unittest

from muxtwist._text import BurstLog, LogThrottle, printable


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


class BurstLogTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.tails: list[tuple[str, int, float]] = []
        self.burst: BurstLog[str] = BurstLog(
            self.clock, lambda held, n: self.tails.append((held, n, self.clock.seconds()))
        )

    def test_burst_then_quiet_reports_the_tail_a_second_after_the_first_left_out(self) -> None:
        """A burst that stops gets one tail call (the last held, the count) an interval after the first left out."""
        self.assertEqual(self.burst.admit("k", "e0"), 0)
        self.clock.advance(0.25)
        self.assertEqual([self.burst.admit("k", f"e{i}") for i in range(1, 6)], [None] * 5)
        self.clock.advance(0.5)
        self.assertEqual(self.burst.pending, 1)
        self.clock.advance(0.5)
        self.assertEqual(self.tails, [("e5", 5, 1.25)])
        self.assertEqual((self.burst.pending, self.clock.getDelayedCalls()), (0, []))
        self.clock.advance(10)
        self.assertEqual(len(self.tails), 1)

    def test_next_line_carries_the_count_and_cancels_the_tail(self) -> None:
        """A line let through before the tail is due carries the count; no tail follows."""
        self.burst.admit("k", "e0")
        self.clock.advance(0.5)
        self.assertIsNone(self.burst.admit("k", "e1"))
        self.clock.advance(0.5)
        self.assertEqual(self.burst.admit("k", "e2"), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(5)
        self.assertEqual(self.tails, [])

    def test_after_a_tail_the_next_line_waits_an_interval(self) -> None:
        """The tail counts as a line: the next one within an interval is left out, and counted by the next tail."""
        self.burst.admit("k", "e0")
        self.burst.admit("k", "e1")
        self.clock.advance(1.0)
        self.assertEqual(self.tails, [("e1", 1, 1.0)])
        self.clock.advance(0.5)
        self.assertIsNone(self.burst.admit("k", "e2"))
        self.clock.advance(1.0)
        self.assertEqual(self.tails[1:], [("e2", 1, 2.5)])

    def test_flush_reports_every_pending_count_at_once(self) -> None:
        """flush() reports each key's pending count now and leaves no timer; keys are counted apart."""
        for key in ("a", "b"):
            self.burst.admit(key, f"{key}0")
            for i in range(1, 4):
                self.burst.admit(key, f"{key}{i}")
        self.burst.admit("c", "c0")
        self.burst.flush()
        self.assertEqual(sorted(self.tails), [("a3", 3, 0.0), ("b3", 3, 0.0)])
        self.assertEqual((self.burst.pending, self.clock.getDelayedCalls()), (0, []))
        self.burst.flush()
        self.assertEqual(len(self.tails), 2)


class BurstLogMachine(RuleBasedStateMachine):
    """
    Events for a few keys, clock advances and flushes, in any order: each
    event is logged as its own line or counted by exactly one later line.
    """

    KEYS = ("a", "b", "c")

    def __init__(self) -> None:
        super().__init__()
        self.clock = task.Clock()
        self.burst: BurstLog[int] = BurstLog(self.clock, self.tail)
        self.serial = 0
        self.key_of: dict[int, str] = {}
        #: per key, the events left out and not yet counted by a line.
        self.uncounted: dict[str, list[int]] = {k: [] for k in self.KEYS}
        #: per key, when its last line (own, tail, not a flush's) was written.
        self.last_line: dict[str, float] = {}
        self.last_event = 0.0
        self.flushing = False
        self.own = 0
        self.counted = 0

    def tail(self, held: int, count: int) -> None:
        key = self.key_of[held]
        # The tail counts exactly the events left out since the last line, the last of them held.
        assert self.uncounted[key] and held == self.uncounted[key][-1], (key, held, self.uncounted[key])
        assert count == len(self.uncounted[key]), (count, self.uncounted[key])
        self.line(key)
        self.counted += count
        self.uncounted[key].clear()

    def line(self, key: str) -> None:
        now = self.clock.seconds()
        if not self.flushing:
            previous = self.last_line.get(key)
            assert previous is None or now - previous >= self.burst.interval, (key, previous, now)
            self.last_line[key] = now

    @rule(key=st.sampled_from(KEYS))
    def event(self, key: str) -> None:
        self.serial += 1
        self.key_of[self.serial] = key
        self.last_event = self.clock.seconds()
        count = self.burst.admit(key, self.serial)
        if count is None:
            self.uncounted[key].append(self.serial)
            return
        assert count == len(self.uncounted[key]), (count, self.uncounted[key])
        self.line(key)
        self.own += 1
        self.counted += count
        self.uncounted[key].clear()

    @rule(seconds=st.sampled_from([0.0, 0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 4.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def flush(self) -> None:
        self.flushing = True
        try:
            self.burst.flush()
        finally:
            self.flushing = False
        assert not any(self.uncounted.values()), self.uncounted
        assert self.clock.getDelayedCalls() == []

    @invariant()
    def every_event_accounted_once(self) -> None:
        waiting = sum(len(v) for v in self.uncounted.values())
        assert self.own + self.counted + waiting == self.serial, (self.own, self.counted, waiting, self.serial)

    @invariant()
    def a_timer_only_for_a_pending_count(self) -> None:
        pending = {k for k, v in self.uncounted.items() if v}
        assert self.burst.pending == len(pending) == len(self.clock.getDelayedCalls()), (pending, self.burst.pending)

    @invariant()
    def quiet_for_an_interval_leaves_nothing_pending(self) -> None:
        if self.clock.seconds() - self.last_event >= self.burst.interval:
            assert self.clock.getDelayedCalls() == [], self.clock.getDelayedCalls()
            assert not any(self.uncounted.values()), self.uncounted


class BurstLogModelTests(unittest.TestCase):
    def test_burst_log_model(self) -> None:
        """Under any interleaving of events on several keys, clock advances and flushes, each event is told once."""
        run_state_machine_as_test(
            BurstLogMachine,
            settings=settings(
                max_examples=200, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
            ),
        )
