"""muxtwist._deadlines: many timers of one length behind one DelayedCall, on task.Clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from muxtwist._deadlines import Deadlines


class DeadlinesTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.timers = Deadlines(self.clock, 5.0)
        self.fired: list[str] = []

    def test_each_fires_after_the_delay_in_order(self) -> None:
        """Timers started at different times each fire delay seconds after their start, in order."""
        self.timers.add(lambda: self.fired.append("a"))
        self.clock.advance(1.5)
        self.timers.add(lambda: self.fired.append("b"))
        self.clock.advance(3.4)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, ["a"])
        self.clock.advance(1.4)
        self.assertEqual(self.fired, ["a"])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, ["a", "b"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_delayed_call_for_many(self) -> None:
        """A thousand live timers hold one DelayedCall."""
        for _ in range(1000):
            self.timers.add(lambda: None)
            self.clock.advance(0.001)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(self.timers.live, 1000)

    def test_cancelled_never_fires_and_idle_holds_nothing(self) -> None:
        """A cancelled timer never fires, and once none is live no DelayedCall is left."""
        a = self.timers.add(lambda: self.fired.append("a"))
        b = self.timers.add(lambda: self.fired.append("b"))
        a.cancel()
        self.assertFalse(a.active())
        self.assertTrue(b.active())
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        b.cancel()
        b.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.timers.live, 0)
        self.clock.advance(10)
        self.assertEqual(self.fired, [])

    def test_cancelled_head_rearms_for_the_next(self) -> None:
        """With the oldest timer cancelled, the next one still fires on time."""
        a = self.timers.add(lambda: self.fired.append("a"))
        self.clock.advance(2)
        self.timers.add(lambda: self.fired.append("b"))
        a.cancel()
        self.clock.advance(3)
        self.assertEqual(self.fired, [])
        self.clock.advance(2)
        self.assertEqual(self.fired, ["b"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_added_while_firing(self) -> None:
        """A timer started by a firing callback fires a full delay later, and the older ones stay on time."""
        self.timers.add(lambda: self.timers.add(lambda: self.fired.append("again")))
        self.clock.advance(1)
        self.timers.add(lambda: self.fired.append("b"))
        self.clock.advance(4)
        self.assertEqual(self.fired, [])
        self.clock.advance(1)
        self.assertEqual(self.fired, ["b"])
        self.clock.advance(4)
        self.assertEqual(self.fired, ["b", "again"])

    def test_a_raising_callback_does_not_stop_the_others(self) -> None:
        """A callback that raises is logged; the timers due with it still fire."""

        def boom() -> None:
            raise RuntimeError("boom")

        self.timers.add(boom)
        self.timers.add(lambda: self.fired.append("b"))
        self.clock.advance(5)
        self.assertEqual(self.fired, ["b"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
