"""
The reliability scenarios of ``tests/reliability/`` in the normal test run:
each one runs a real ``twistd muxtwist`` and must come out green.
"""

from __future__ import annotations

from twisted.trial import unittest

from tests.reliability import Scenario, faults, hostile, lifecycle, load, run_scenario


class ReliabilityTests(unittest.TestCase):
    """Every scenario, green."""

    def check(self, scenario: Scenario) -> None:
        red = [f"{r.name}: {r.result}" for r in run_scenario(scenario) if not r.green]
        self.assertEqual(red, [])

    def test_mixed_load(self) -> None:
        """1,100 concurrent connections over 11 protocols through one port arrive intact, none misrouted."""
        self.check(load.mixed_load)

    def test_byte_dribble(self) -> None:
        """Every protocol's real client bytes, one byte every 2 ms, interleaved, reach the right service."""
        self.check(load.byte_dribble)

    def test_hostile_clients(self) -> None:
        """Hostile clients of every kind are shed in time with memory bounded, while legitimate ones are served."""
        self.check(hostile.hostile_clients)

    def test_untrusted_proxy_headers(self) -> None:
        """PROXY headers from untrusted peers are refused, from trusted ones honoured."""
        self.check(hostile.untrusted_proxy_headers)

    def test_shutdown_under_load(self) -> None:
        """SIGTERM with transfers in flight: those that can finish in shutdown_timeout do, intact; exit 0."""
        self.check(lifecycle.shutdown_under_load)

    def test_reload_under_load(self) -> None:
        """Repeated SIGHUP during traffic fails no connection."""
        self.check(lifecycle.reload_under_load)

    def test_backend_faults(self) -> None:
        """Refused, black-holed, resetting, slow and killed backends end their clients' connections, leak nothing."""
        self.check(faults.backend_faults)
