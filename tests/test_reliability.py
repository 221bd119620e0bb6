"""
The reliability scenarios of ``tests/reliability/`` in the normal test run:
each one runs a real ``twistd muxtwist`` and must come out green.
"""

from __future__ import annotations

from twisted.trial import unittest

from tests.reliability import Scenario, attacks, faults, hostile, lifecycle, load, run_scenario
from tests.reliability.__main__ import KEPT_BEGIN, KEPT_END, kept_sections, render
from tests.reliability.harness import Row


class PageTests(unittest.SynchronousTestCase):
    """The generated docs/reliability.md."""

    def test_regenerated_page_keeps_hand_written_sections(self) -> None:
        """Sections between the kept markers of the old page come back, in order, after the generated tables."""
        relay = f"{KEPT_BEGIN}\n## Relay\n\nby hand\n{KEPT_END}"
        fuzz = f"{KEPT_BEGIN}\n## Fuzzing\n\n| a | b |\n{KEPT_END}"
        old = f"# Reliability\n\n| old table |\n\n{relay}\n\nstray text\n\n{fuzz}\n"
        rows = [
            Row("Mixed load", "t", "1", "r", True),
            Row("Echo", "t", "1", "r", False, figure="+1 KiB", table="hostile"),
        ]
        page = render(rows, 1.0, kept_sections(old))
        self.assertIn(relay, page)
        self.assertIn(fuzz, page)
        self.assertLess(page.index("| Mixed load |"), page.index("## Hostile clients"))
        self.assertLess(page.index("| Echo |"), page.index(relay))
        self.assertLess(page.index(relay), page.index(fuzz))
        self.assertIn("| +1 KiB |", page)
        self.assertNotIn("stray text", page)


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

    def test_tls_close(self) -> None:
        """TLS clients behind TerminateTLS get close_notify and whole answers; half-closers of a TLS backend too."""
        self.check(attacks.tls_close)

    def test_silent_untrusted_clients(self) -> None:
        """Untrusted silent clients on a PROXY listener reach on_timeout (a server-speaks-first backend)."""
        self.check(attacks.silent_untrusted_clients)

    def test_trusted_cut_short_headers(self) -> None:
        """A trusted peer's PROXY header cut short by FIN or the timeout is refused, never proxied."""
        self.check(attacks.trusted_cut_short_headers)

    def test_log_hygiene(self) -> None:
        """Control bytes from clients reach the log escaped; a refusal flood logs about a line a second."""
        self.check(attacks.log_hygiene)

    def test_sighup_storms(self) -> None:
        """SIGHUP storms during start-up (single and --workers) and under load kill nothing and fail no exchange."""
        self.check(attacks.sighup_storms)

    def test_host_ambiguity(self) -> None:
        """No host rule takes an ambiguous request that the twisted.web vhost behind serves as another host."""
        self.check(attacks.host_ambiguity)

    def test_echo_backpressure(self) -> None:
        """Clients writing to the built-in Echo without reading keep the server's memory bounded."""
        self.check(attacks.echo_backpressure)

    def test_stalled_handshakes(self) -> None:
        """Stalled TLS handshakes beyond the overall and per-source limits are refused at once, memory bounded."""
        self.check(attacks.stalled_handshakes)
