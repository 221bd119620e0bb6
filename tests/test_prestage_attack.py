"""
Hostile clients against the PROXY pre-stage of a listener with
``accept_proxy_protocol``: what a connect loop of refused connections writes
to the log (one line a second per kind of refusal, not one per connection).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from muxtwist import Rule, SniffingFactory
from muxtwist.matchers import Any as AnyMatcher
from muxtwist.matchers.proxy_protocol import build_v1
from muxtwist.testing import MemoryConnection
from tests.test_sniffing import RecordingFactory

BALANCER = IPv4Address("TCP", "10.0.0.1", 5000)
STRANGER = IPv4Address("TCP", "192.0.2.1", 5000)
CLIENT_HEADER = build_v1(("198.51.100.7", 40000), ("10.0.0.1", 443))


def _sniffer_lines(test: unittest.TestCase) -> list[dict[str, Any]]:
    """Every event the sniffer logs from now on, for the test's duration."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if str(event.get("log_namespace", "")).startswith("muxtwist"):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


def _factory(**kw: Any) -> tuple[SniffingFactory, task.Clock]:
    clock = task.Clock()
    factory = SniffingFactory(
        [Rule(AnyMatcher(), RecordingFactory(), name="any")],
        accept_proxy_protocol=["10.0.0.1/32"],
        reactor=clock,
        **kw,
    )
    return factory, clock


class RefusedConnectLoopTests(unittest.TestCase):
    def test_untrusted_proxy_header_loop_logs_one_line_a_second(self) -> None:
        """A loop of untrusted peers sending PROXY headers writes one refusal line a second, with a count."""
        events = _sniffer_lines(self)
        factory, clock = _factory()
        for i in range(50):
            conn = MemoryConnection(factory, clock=clock, peer=STRANGER)
            conn.send(CLIENT_HEADER + b"hello")
            self.assertFalse(conn.transport.connected)
            if i == 0:
                clock.advance(0.25)  # the loop goes on: the next line comes before the tail would be due
        self.assertEqual(factory.connections, set())
        self.assertLessEqual(len(events), 2, [formatEvent(e) for e in events])
        clock.advance(0.75)
        conn = MemoryConnection(factory, clock=clock, peer=STRANGER)
        conn.send(CLIENT_HEADER)
        refusals = [formatEvent(e) for e in events if "refusing" in e.get("log_format", "")]
        self.assertEqual(len(refusals), 2, refusals)
        self.assertIn("49 more", refusals[1])

    def test_per_source_refusals_behind_a_balancer_log_one_line_a_second(self) -> None:
        """Clients over the per-source limit behind a balancer write one line a second, as direct ones do."""
        from muxtwist.metrics import Metrics

        events = _sniffer_lines(self)
        factory, clock = _factory(max_connections_per_source=1, metrics=Metrics())
        held = MemoryConnection(factory, clock=clock, peer=BALANCER)
        held.send(CLIENT_HEADER + b"first")
        self.assertTrue(held.transport.connected)
        del events[:]
        for _ in range(50):
            conn = MemoryConnection(factory, clock=clock, peer=BALANCER)
            conn.send(CLIENT_HEADER + b"again")
            self.assertFalse(conn.transport.connected)
        self.assertEqual(len(factory.connections), 1)
        self.assertLessEqual(len(events), 2, [formatEvent(e) for e in events])
        rejected = factory.metrics.value("muxtwist_limit_rejections_total", limit="max_connections_per_source")
        self.assertGreaterEqual(rejected or 0, 50)

    def test_connection_end_lines_of_served_connections_are_all_written(self) -> None:
        """Throttling refusals leaves the connection_end line of every served connection in the log."""
        events = _sniffer_lines(self)
        factory, clock = _factory()
        for _ in range(20):
            conn = MemoryConnection(factory, clock=clock, peer=BALANCER)
            conn.send(CLIENT_HEADER + b"hello")
            conn.transport.loseConnection()
        ends = [e for e in events if e.get("log_event") == "connection_end"]
        self.assertEqual(len(ends), 20)
