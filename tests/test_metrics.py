"""
Tests for the per-connection end event, the Prometheus metrics, the limits
(global, per rule, per source) and the admin site, all in memory.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from muxtwist.admin import admin_site
from muxtwist.default import Echo
from muxtwist.matchers import Any as AnyMatcher
from muxtwist.matchers import Prefix
from muxtwist.metrics import Metrics
from muxtwist.proxy import Proxy
from muxtwist.service import MuxService
from muxtwist.sniffing import Outcome, Rule, SniffingFactory
from muxtwist.testing import MemoryConnection


def peer(host: str, port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


class Events:
    """Collect the connection end events while a test runs."""

    def __init__(self, case: unittest.TestCase) -> None:
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self)
        case.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_event") == "connection_end":
            self.events.append(event)


def echo() -> Factory:
    return Factory.forProtocol(Echo)


def render(site: Any, path: bytes) -> tuple[int, bytes]:
    request = DummyRequest(path.strip(b"/").split(b"/"))
    request.path = path
    resource = site.getResourceFor(request)
    body = resource.render(request)
    return request.responseCode or 200, body


class EndEventTests(unittest.TestCase):
    """One structured log event per connection, when it ends."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics()
        self.events = Events(self)

    def factory(self, rules: list[Rule], **kwargs: Any) -> SniffingFactory:
        return SniffingFactory(rules, reactor=self.clock, metrics=self.metrics, **kwargs)

    def test_handed_off(self) -> None:
        """A handed-off connection's event names the rule, peer, local port, bytes, times and outcome."""
        conn = MemoryConnection(self.factory([Rule(Prefix(b"HI"), echo(), name="hi")]), clock=self.clock)
        self.clock.advance(0.25)
        conn.send(b"HI there")
        self.clock.advance(1.0)
        conn.close()
        [event] = self.events.events
        self.assertEqual(event["rule"], "hi")
        self.assertEqual(event["outcome"], "handed_off")
        self.assertEqual(event["peer"], "192.0.2.1:40000")
        self.assertEqual(event["local_port"], 3000)
        self.assertEqual(event["bytes_in"], 8)
        self.assertEqual(event["bytes_out"], 0)
        self.assertAlmostEqual(event["sniff_time"], 0.25)
        self.assertAlmostEqual(event["duration"], 1.25)
        text = formatEvent(event)
        self.assertIn("192.0.2.1:40000", text)
        self.assertIn("handed_off", text)

    def test_timeout_and_no_match(self) -> None:
        """Timeouts and non-matching clients end with their own outcomes and are counted by outcome."""
        factory = self.factory([Rule(Prefix(b"HI"), echo(), name="hi")], sniff_timeout=2.0)
        silent = MemoryConnection(factory, clock=self.clock)
        self.clock.advance(2.0)
        other = MemoryConnection(factory, clock=self.clock)
        other.send(b"NOPE")
        for c in (silent, other):
            c.close()
        outcomes = sorted(e["outcome"] for e in self.events.events)
        self.assertEqual(outcomes, ["no_match", "timeout"])
        self.assertEqual(self.metrics.value("muxtwist_connections_total", rule="on_timeout", outcome="timeout"), 1)
        self.assertEqual(self.metrics.value("muxtwist_connections_total", rule="on_no_match", outcome="no_match"), 1)
        self.assertEqual(self.metrics.value("muxtwist_sniffed_bytes_total", rule="on_no_match", direction="in"), 4)
        self.assertEqual(self.metrics.value("muxtwist_sniff_duration_seconds_count"), 2)
        self.assertEqual(self.metrics.value("muxtwist_sniff_duration_seconds_bucket", le="2.5"), 2)
        self.assertEqual(self.metrics.value("muxtwist_sniff_duration_seconds_bucket", le="1.0"), 1)

    def test_proxy_source_is_the_peer(self) -> None:
        """After an accepted PROXY header the event's peer is the PROXY source."""
        factory = self.factory([Rule(AnyMatcher(), echo(), name="any")], accept_proxy_protocol=["192.0.2.0/24"])
        conn = MemoryConnection(factory, clock=self.clock)
        conn.send(b"PROXY TCP4 203.0.113.9 198.51.100.1 5555 443\r\nhello")
        conn.close()
        [event] = self.events.events
        self.assertEqual(event["peer"], "203.0.113.9:5555")

    def test_backend_failed(self) -> None:
        """A proxied connection whose backends all fail ends as backend_failed."""
        reactor = MemoryReactorClock()  # connects never complete
        proxy = Proxy("tcp:host=127.0.0.1:port=1", reactor=reactor, connect_timeout=1.0)
        factory = SniffingFactory([Rule(AnyMatcher(), proxy, name="db")], reactor=reactor, metrics=self.metrics)
        conn = MemoryConnection(factory)
        conn.send(b"hello")
        reactor.advance(1.5)  # the connect attempt times out
        conn.close()
        [event] = self.events.events
        self.assertEqual(event["outcome"], "backend_failed")
        self.assertEqual(self.metrics.value("muxtwist_connections_total", rule="db", outcome="backend_failed"), 1)
        self.assertEqual(self.metrics.value("muxtwist_proxy_gave_up_total", rule="db"), 1)
        self.assertEqual(
            self.metrics.value(
                "muxtwist_backend_failures_total", rule="db", backend=proxy.backends[0].description, kind="timeout"
            ),
            1,
        )


class LiveMetricsTests(unittest.TestCase):
    """Live numbers are read from the factories and proxies at scrape time."""

    def test_active_by_rule(self) -> None:
        """muxtwist_active_connections follows the rules' live connections."""
        clock, metrics = Clock(), Metrics()
        factory = SniffingFactory([Rule(AnyMatcher(), echo(), name="e")], reactor=clock, metrics=metrics)
        conns = [MemoryConnection(factory, clock=clock) for _ in range(3)]
        self.assertEqual(metrics.value("muxtwist_sniffing_connections"), 3)
        for c in conns:
            c.send(b"x")
        self.assertEqual(metrics.value("muxtwist_active_connections", rule="e"), 3)
        conns[0].close()
        self.assertEqual(metrics.value("muxtwist_active_connections", rule="e"), 2)

    def test_backend_health(self) -> None:
        """Each backend of a proxy reachable from the rules, also through a nested factory, is exported."""
        clock, metrics = Clock(), Metrics()
        proxy = Proxy(["tcp:host=127.0.0.1:port=1", "tcp:host=127.0.0.1:port=2"], reactor=clock)
        proxy.backends[1].stats.healthy = False
        proxy.backends[0].stats.total = 7
        inner = SniffingFactory([Rule(AnyMatcher(), proxy, name="pg")], reactor=clock, metrics=metrics)
        SniffingFactory([Rule(AnyMatcher(), inner, name="outer")], reactor=clock, metrics=metrics)
        first, second = (b.description for b in proxy.backends)
        self.assertEqual(metrics.value("muxtwist_backend_up", rule="pg", backend=first), 1)
        self.assertEqual(metrics.value("muxtwist_backend_up", rule="pg", backend=second), 0)
        self.assertEqual(metrics.value("muxtwist_backend_connections_total", rule="pg", backend=first), 7)


class LimitTests(unittest.TestCase):
    """max_connections globally, per rule and per source: refused, closed and counted."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics()

    def test_global(self) -> None:
        """Above max_connections the factory builds nothing and counts a rejection."""
        factory = SniffingFactory([], max_connections=2, reactor=self.clock, metrics=self.metrics)
        a, b = MemoryConnection(factory, clock=self.clock), MemoryConnection(factory, clock=self.clock)
        self.assertIsNone(factory.buildProtocol(peer("192.0.2.2")))
        self.assertEqual(self.metrics.value("muxtwist_limit_rejections_total", limit="max_connections"), 1)
        a.close()
        self.assertIsNotNone(factory.buildProtocol(peer("192.0.2.2")))
        b.close()

    def test_refused_connections_count_once_in_connections_total(self) -> None:
        """Connections refused by max_connections or max_connections_per_source end once as rejected, as others do."""
        factory = SniffingFactory(
            [Rule(AnyMatcher(), echo(), name="e")],
            max_connections=2,
            max_connections_per_source=1,
            reactor=self.clock,
            metrics=self.metrics,
        )
        a = MemoryConnection(factory, clock=self.clock, peer=peer("192.0.2.1"))
        self.assertIsNone(factory.buildProtocol(peer("192.0.2.1", 2)))
        b = MemoryConnection(factory, clock=self.clock, peer=peer("192.0.2.2"))
        self.assertIsNone(factory.buildProtocol(peer("192.0.2.3")))
        for c in (a, b):
            c.send(b"x")
            c.close()
        total = self.metrics.value
        self.assertEqual(total("muxtwist_connections_total", rule="e", outcome="handed_off"), 2)
        self.assertEqual(total("muxtwist_connections_total", rule="-", outcome="rejected"), 2)
        self.assertEqual(total("muxtwist_limit_rejections_total", limit="max_connections"), 1)
        self.assertEqual(total("muxtwist_limit_rejections_total", limit="max_connections_per_source"), 1)
        self.assertEqual(sum(self.metrics.connections_by_outcome().values()), 4)
        self.assertEqual(factory.stats["-"].outcomes, {"rejected": 2})

    def test_per_rule(self) -> None:
        """A rule at its max_connections closes the next matching connection; other rules still serve."""
        rules = [
            Rule(Prefix(b"A"), echo(), name="a", max_connections=1),
            Rule(AnyMatcher(), echo(), name="rest"),
        ]
        factory = SniffingFactory(rules, reactor=self.clock, metrics=self.metrics)
        first = MemoryConnection(factory, clock=self.clock)
        first.send(b"A1")
        second = MemoryConnection(factory, clock=self.clock)
        second.send(b"A2")
        self.assertEqual(second.outcome, Outcome.REJECTED)
        self.assertFalse(second.transport.connected)
        third = MemoryConnection(factory, clock=self.clock)
        third.send(b"B")
        self.assertEqual(third.rule_name, "rest")
        self.assertEqual(self.metrics.value("muxtwist_limit_rejections_total", limit="rule_max_connections"), 1)
        first.close()
        fourth = MemoryConnection(factory, clock=self.clock)
        fourth.send(b"A4")
        self.assertEqual(fourth.outcome, Outcome.HANDED_OFF)

    def test_rule_limit_validated(self) -> None:
        """Rule max_connections must be a positive integer."""
        with self.assertRaises(ValueError):
            Rule(AnyMatcher(), echo(), max_connections=0)

    def test_per_source(self) -> None:
        """max_connections_per_source counts by host; a freed slot can be used again."""
        factory = SniffingFactory(
            [Rule(AnyMatcher(), echo())], max_connections_per_source=2, reactor=self.clock, metrics=self.metrics
        )
        a = MemoryConnection(factory, clock=self.clock, peer=peer("192.0.2.7", 1))
        MemoryConnection(factory, clock=self.clock, peer=peer("192.0.2.7", 2))
        with self.assertRaises(RuntimeError):
            MemoryConnection(factory, clock=self.clock, peer=peer("192.0.2.7", 3))
        MemoryConnection(factory, clock=self.clock, peer=peer("192.0.2.8", 1))
        self.assertEqual(self.metrics.value("muxtwist_limit_rejections_total", limit="max_connections_per_source"), 1)
        a.close()
        MemoryConnection(factory, clock=self.clock, peer=peer("192.0.2.7", 4))

    def test_per_source_after_proxy_header(self) -> None:
        """Behind a trusted proxy the limit applies to the PROXY source, not to the proxy's address."""
        factory = SniffingFactory(
            [Rule(AnyMatcher(), echo())],
            max_connections_per_source=1,
            accept_proxy_protocol=["192.0.2.0/24"],
            reactor=self.clock,
            metrics=self.metrics,
        )
        header = b"PROXY TCP4 203.0.113.%d 198.51.100.1 5555 443\r\n"
        a = MemoryConnection(factory, clock=self.clock, peer=peer("192.0.2.1", 1))
        a.send(header % 1 + b"x")
        b = MemoryConnection(factory, clock=self.clock, peer=peer("192.0.2.1", 2))
        b.send(header % 2 + b"x")
        c = MemoryConnection(factory, clock=self.clock, peer=peer("192.0.2.1", 3))
        c.send(header % 1 + b"x")
        self.assertEqual([x.outcome for x in (a, b, c)], [Outcome.HANDED_OFF, Outcome.HANDED_OFF, Outcome.REJECTED])
        self.assertFalse(c.transport.connected)


class AdminSiteTests(unittest.TestCase):
    """admin_site() serves /metrics from our registry and /ready from the service state."""

    def test_metrics(self) -> None:
        """/metrics is the text exposition of the given registry only."""
        clock, metrics = Clock(), Metrics()
        factory = SniffingFactory([Rule(AnyMatcher(), echo(), name="e")], reactor=clock, metrics=metrics)
        MemoryConnection(factory, clock=clock).send(b"x")
        code, body = render(admin_site(registry=metrics), b"/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b'muxtwist_active_connections{rule="e"} 1.0', body)
        self.assertIn(b"muxtwist_sniff_duration_seconds_bucket", body)
        self.assertNotIn(b"python_gc", body)  # not the prometheus_client global registry

    def test_ready_follows_draining(self) -> None:
        """/ready is 200 while the service runs and 503 once it drains."""
        service = MuxService(reactor=Clock(), metrics=Metrics())
        site = admin_site(service, Metrics())
        self.assertEqual(render(site, b"/ready")[0], 503)
        service.startService()
        self.assertEqual(render(site, b"/ready"), (200, b"ready\n"))
        service.draining = True
        self.assertEqual(render(site, b"/ready"), (503, b"draining\n"))
        service.draining = False
        service.stopService()
        self.assertTrue(service.draining)
        self.assertEqual(render(site, b"/ready")[0], 503)

    def test_ready_without_service(self) -> None:
        """Without a service, /ready always answers 200."""
        self.assertEqual(render(admin_site(registry=Metrics()), b"/ready")[0], 200)

    def test_as_a_rule(self) -> None:
        """admin_site() works as a rule's factory behind HTTP1(path=...)."""
        from muxtwist.matchers import HTTP1

        clock, metrics = Clock(), Metrics()
        factory = SniffingFactory(
            [Rule(HTTP1(path="/metrics"), admin_site(registry=metrics), name="admin")], reactor=clock, metrics=metrics
        )
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", conn.transport.value())
        self.assertIn(b'muxtwist_active_connections{rule="admin"} 1.0', conn.transport.value())


class StatusPageTests(unittest.TestCase):
    """The built-in status page shows the numbers /metrics exports."""

    def test_same_numbers(self) -> None:
        """status() reports the Metrics counters by outcome and the limit rejections."""
        from muxtwist.default import status

        clock, metrics = Clock(), Metrics()
        service = MuxService(reactor=clock, metrics=metrics)
        factory = SniffingFactory([Rule(Prefix(b"A"), echo(), name="a")], reactor=clock, metrics=metrics)
        MemoryConnection(factory, clock=clock).send(b"A")
        other = MemoryConnection(factory, clock=clock)
        other.send(b"B")
        data = status(service)
        self.assertEqual(data["connections_by_outcome"], {"no_match": 1.0})
        self.assertEqual(
            data["connections_by_outcome"]["no_match"],  # type: ignore[index]
            metrics.value("muxtwist_connections_total", rule="on_no_match", outcome="no_match"),
        )
        self.assertEqual(data["limit_rejections"]["emfile"], 0)  # type: ignore[index]


class ReloadSettingsTests(unittest.TestCase):
    """A reload gives running listeners the new limits."""

    def test_limits_reloaded(self) -> None:
        """max_connections_per_source and a rule's max_connections change on reload; a broken file changes nothing."""
        from muxtwist.config import load_config

        path = self.mktemp() + ".py"
        template = (
            "from twisted.internet.protocol import Factory, Protocol\n"
            "from muxtwist import Rule\nfrom muxtwist.matchers import Any\n"
            "rules = [Rule(Any(), Factory.forProtocol(Protocol), name='r', max_connections={rule})]\n"
            "max_connections_per_source = {source}\n"
        )
        with open(path, "w") as f:
            f.write(template.format(rule=1, source=2))
        service = MuxService(config_path=path, ports=("tcp:0:interface=127.0.0.1",), reactor=Clock(), metrics=Metrics())
        service.load(load_config(path))
        [listener] = service.listeners.values()
        self.assertEqual(listener.factory.max_connections_per_source, 2)
        with open(path, "w") as f:
            f.write(template.format(rule=5, source=9))
        self.assertTrue(self.successResultOf(service.reload()))
        self.assertEqual(listener.factory.max_connections_per_source, 9)
        self.assertEqual(listener.factory.rules[0].max_connections, 5)
        with open(path, "w") as f:
            f.write(template.format(rule=0, source=9))
        self.assertFalse(self.successResultOf(service.reload()))
        self.assertEqual(listener.factory.rules[0].max_connections, 5)
