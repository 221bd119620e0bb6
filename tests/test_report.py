"""
Reporting as an interface: metrics and the connection_end log observe
connection ends, and metrics read proxies through IBackendPool.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from muxtwist._report import ConnectionLog, Observers
from muxtwist.interfaces import BackendState, ConnectionEnd, IBackendPool, IConnectionObserver, RelayState
from muxtwist.matchers import Any
from muxtwist.metrics import Metrics, backend_pools
from muxtwist.proxy import Proxy
from muxtwist.sniffing import Rule, SniffingFactory

END = ConnectionEnd(
    rule="web",
    outcome="handed_off",
    sniff_time=0.002,
    sniffed_in=120,
    sniffed_out=0,
    relayed_in=4000,
    relayed_out=90000,
    transparent=True,
    peer="192.0.2.7:40000",
    local_port=3000,
    duration=1.5,
)


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def connection_end(self, end: ConnectionEnd) -> None:
        self.calls.append(("end", end))

    def limit_rejected(self, limit: str) -> None:
        self.calls.append(("limit", limit))


class ObserverTests(unittest.TestCase):
    def test_metrics_observes_connection_ends(self) -> None:
        """Metrics provides IConnectionObserver and counts an end and a refusal told through it."""
        metrics = Metrics()
        verifyObject(IConnectionObserver, metrics)
        metrics.connection_end(END)
        metrics.limit_rejected("max_connections")
        self.assertEqual(metrics.value("muxtwist_connections_total", rule="web", outcome="handed_off"), 1)
        self.assertEqual(metrics.value("muxtwist_sniffed_bytes_total", rule="web", direction="in"), 120)
        self.assertEqual(metrics.value("muxtwist_sniff_duration_seconds_count"), 1)
        self.assertEqual(metrics.value("muxtwist_limit_rejections_total", limit="max_connections"), 1)

    def test_log_observer_emits_connection_end(self) -> None:
        """ConnectionLog logs one connection_end event with every field the sniffer's event has."""
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        observer = ConnectionLog()
        verifyObject(IConnectionObserver, observer)
        observer.connection_end(END)
        (event,) = [e for e in events if e.get("log_event") == "connection_end"]
        self.assertEqual(event["log_namespace"], "muxtwist.sniffing")
        expected = {
            "peer": "192.0.2.7:40000",
            "local_port": 3000,
            "rule": "web",
            "outcome": "handed_off",
            "sniff_time": 0.002,
            "bytes_in": 120,
            "bytes_out": 0,
            "relayed_in": 4000,
            "relayed_out": 90000,
            "transparent": True,
            "duration": 1.5,
        }
        self.assertEqual({k: event[k] for k in expected}, expected)
        renamed = {"sniffed_in": "bytes_in", "sniffed_out": "bytes_out"}
        for field in attrs.fields(ConnectionEnd):
            self.assertIn(renamed.get(field.name, field.name), event)
        from twisted.logger import formatEvent

        self.assertEqual(
            formatEvent(event),
            "connection 192.0.2.7:40000 -> port 3000 ended: handed_off, rule web, sniffed 0.0020s, "
            "120 bytes in / 0 out while sniffing, 1.500s, relayed from the client's address",
        )

    def test_fan_out(self) -> None:
        """Observers tells each observer, in order, of ends and refusals."""
        first, second = _Recorder(), _Recorder()
        both = Observers(first, second)
        verifyObject(IConnectionObserver, both)
        both.connection_end(END)
        both.limit_rejected("emfile")
        self.assertEqual(first.calls, [("end", END), ("limit", "emfile")])
        self.assertEqual(second.calls, first.calls)


@implementer(IBackendPool, IProtocolFactory)
class _Pool(Factory):
    gave_up = 3
    transparent = False

    def backend_states(self) -> Sequence[BackendState]:
        return [BackendState("tcp:host=10.0.0.1:port=80", False, 2, 9, 0, 4, {"refused": 4})]

    def open_relays(self) -> Sequence[RelayState]:
        return []


class BackendPoolTests(unittest.TestCase):
    def test_metrics_read_a_declared_pool(self) -> None:
        """A factory that provides IBackendPool (and has no backends list) is read through the interface."""
        metrics = Metrics()
        factory = SniffingFactory([Rule(Any(), _Pool(), name="pool")], metrics=metrics, reactor=Clock())
        self.assertEqual([name for name, _ in backend_pools(factory)], ["pool"])
        labels = {"rule": "pool", "backend": "tcp:host=10.0.0.1:port=80"}
        self.assertEqual(metrics.value("muxtwist_backend_up", **labels), 0)
        self.assertEqual(metrics.value("muxtwist_backend_active_connections", **labels), 2)
        self.assertEqual(metrics.value("muxtwist_backend_connections_total", **labels), 9)
        self.assertEqual(metrics.value("muxtwist_backend_failures_total", kind="refused", **labels), 4)
        self.assertEqual(metrics.value("muxtwist_proxy_gave_up_total", rule="pool"), 3)

    def test_proxy_provides_backend_pool(self) -> None:
        """Proxy declares IBackendPool itself, and backend_pools yields the proxy, not an adapter of it."""
        clock = Clock()
        proxy = Proxy(["tcp:host=127.0.0.1:port=1", "tcp:host=127.0.0.1:port=2"], reactor=clock)
        self.assertTrue(verifyObject(IBackendPool, proxy))
        factory = SniffingFactory([Rule(Any(), proxy, name="p")], metrics=Metrics(), reactor=clock)
        ((name, pool),) = backend_pools(factory)
        self.assertEqual(name, "p")
        self.assertIs(pool, proxy)
        states = pool.backend_states()
        self.assertEqual([s.description for s in states], [b.description for b in proxy.backends])
        self.assertTrue(all(s.usable and s.active == 0 and s.total == 0 for s in states))
        self.assertEqual(pool.open_relays(), [])

    def test_backend_states_say_health_and_skips(self) -> None:
        """A backend's state carries the active check's verdict and passive health's skip, as reactor times."""
        from muxtwist.proxy import HealthCheck

        clock = Clock()
        clock.advance(100)
        proxy = Proxy(
            ["tcp:host=127.0.0.1:port=1", "tcp:host=127.0.0.1:port=2"],
            health_check=HealthCheck(),
            fail_timeout=10.0,
            max_fails=1,
            reactor=clock,
        )
        proxy._connect_failed(proxy.backends[0], "refused")
        proxy.backends[1].stats.healthy = False
        first, second = proxy.backend_states()
        self.assertEqual((first.usable, first.skipped_until, first.errors), (False, 110.0, {"refused": 1}))
        self.assertEqual((second.usable, second.healthy, second.checked), (False, False, True))
        clock.advance(11)
        self.assertEqual((proxy.backend_states()[0].usable, proxy.backend_states()[0].skipped_until), (True, None))
