"""
The reliability scenarios of ``tests/reliability/`` in the normal test run:
each one runs a real ``twistd muxtwist`` and must come out green.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.trial import unittest

from tests.reliability import load, run_scenario
from tests.reliability.harness import Row


class ReliabilityTests(unittest.TestCase):
    """Every scenario, green."""

    def check(self, scenario: Callable[[], Row]) -> None:
        row = run_scenario(scenario)
        self.assertTrue(row.green, f"{row.name}: {row.result}")

    def test_mixed_load(self) -> None:
        """1,100 concurrent connections over 11 protocols through one port arrive intact, none misrouted."""
        self.check(load.mixed_load)

    def test_byte_dribble(self) -> None:
        """Every protocol's real client bytes, one byte every 2 ms, interleaved, reach the right service."""
        self.check(load.byte_dribble)
