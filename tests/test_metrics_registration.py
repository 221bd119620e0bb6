"""
Who counts a sniffing factory's connections is said by whoever owns the
metrics: a :class:`~muxtwist.metrics.Metrics` passed to the factory, or the
:class:`~muxtwist.service.MuxService` that serves it. Building a factory
registers it nowhere and imports no metrics code.
"""

from __future__ import annotations

import json

from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from muxtwist.admin import admin_site
from muxtwist.config import load_config
from muxtwist.default import Echo
from muxtwist.matchers import Any, Prefix
from muxtwist.metrics import Metrics, default_metrics
from muxtwist.service import MuxService
from muxtwist.sniffing import Rule, SniffingFactory
from muxtwist.testing import MemoryConnection
from tests.test_imports import loaded_after
from tests.udp_helpers import Echo as UDPEcho
from tests.udp_helpers import FakePort, make_mux

ENDED = "muxtwist_connections_total"


def echo() -> Factory:
    return Factory.forProtocol(Echo)


def nesting(inner_name: str = "inner") -> tuple[SniffingFactory, SniffingFactory]:
    """An outer factory whose rule ``outer`` hands connections to a nested sniffing factory with rule ``inner_name``."""
    inner = SniffingFactory([Rule(Any(), echo(), name=inner_name)], reactor=Clock())
    outer = SniffingFactory([Rule(Prefix(b"N"), inner, name="outer")], reactor=Clock())
    return outer, inner


def one_connection(factory: SniffingFactory, data: bytes = b"N1") -> None:
    conn = MemoryConnection(factory, clock=Clock())
    conn.send(data)
    conn.close()


class BuildingRegistersNothingTests(unittest.TestCase):
    def test_a_factory_built_without_metrics_is_in_no_global(self) -> None:
        """A SniffingFactory built with no metrics is not read or counted by the process's default Metrics."""
        before = default_metrics().value(ENDED, rule="alone", outcome="handed_off")
        factory = SniffingFactory([Rule(Any(), echo(), name="alone")], reactor=Clock())
        self.assertNotIn(factory, default_metrics().factories)
        one_connection(factory, b"x")
        self.assertEqual(default_metrics().value(ENDED, rule="alone", outcome="handed_off"), before)

    def test_building_a_factory_imports_no_metrics(self) -> None:
        """Building a SniffingFactory loads neither muxtwist.metrics nor prometheus_client."""
        self.assertEqual(loaded_after("from muxtwist.sniffing import SniffingFactory\nSniffingFactory([])"), [])

    def test_metrics_given_to_a_factory_read_and_count_it(self) -> None:
        """A Metrics passed to a factory is the caller's choice: it reads that factory and counts its connections."""
        metrics = Metrics()
        factory = SniffingFactory([Rule(Any(), echo(), name="mine")], reactor=Clock(), metrics=metrics)
        self.assertEqual(metrics.factories, [factory])
        one_connection(factory, b"x")
        self.assertEqual(metrics.value(ENDED, rule="mine", outcome="handed_off"), 1)


class ServiceRegistersWhatItServesTests(unittest.TestCase):
    def test_service_counts_the_factories_it_serves_and_those_nested_in_them(self) -> None:
        """A listener's factory and the sniffing factory nested in its rules count into the service's metrics."""
        metrics = Metrics()
        service = MuxService(reactor=Clock(), metrics=metrics)
        outer, inner = nesting()
        service.add_listener("tcp:0:interface=127.0.0.1", outer)
        self.addCleanup(outer.doStop)
        self.assertEqual(metrics.factories, [outer])
        one_connection(outer)
        self.assertEqual(metrics.value(ENDED, rule="outer", outcome="handed_off"), 1)
        self.assertEqual(metrics.value(ENDED, rule="inner", outcome="handed_off"), 1)

    def test_a_factory_keeps_metrics_it_was_given(self) -> None:
        """A factory built with its own Metrics keeps counting there; the service still reads its live numbers."""
        own, service_metrics = Metrics(), Metrics()
        service = MuxService(reactor=Clock(), metrics=service_metrics)
        factory = SniffingFactory([Rule(Any(), echo(), name="own")], reactor=Clock(), metrics=own)
        service.add_listener("tcp:0:interface=127.0.0.1", factory)
        self.addCleanup(factory.doStop)
        conn = MemoryConnection(factory, clock=Clock())
        conn.send(b"x")
        self.assertEqual(service_metrics.value("muxtwist_active_connections", rule="own"), 1)
        conn.close()
        self.assertEqual(own.value(ENDED, rule="own", outcome="handed_off"), 1)
        self.assertEqual(service_metrics.value(ENDED, rule="own", outcome="handed_off"), 0)

    def test_reload_counts_sniffing_factories_the_new_rules_nest(self) -> None:
        """After a reload, connections through a sniffing factory the new rules nest count into the service metrics."""
        path = self.mktemp() + ".py"
        template = (
            "from twisted.internet.protocol import Factory\n"
            "from muxtwist import Rule, SniffingFactory\n"
            "from muxtwist.default import Echo\n"
            "from muxtwist.matchers import Any\n"
            "inner = SniffingFactory([Rule(Any(), Factory.forProtocol(Echo), name={inner!r})])\n"
            "rules = [Rule(Any(), inner, name='outer')]\n"
        )
        with open(path, "w") as f:
            f.write(template.format(inner="before"))
        metrics = Metrics()
        service = MuxService(config_path=path, ports=("tcp:0:interface=127.0.0.1",), reactor=Clock(), metrics=metrics)
        service.load(load_config(path))
        [listener] = service.listeners.values()
        self.addCleanup(listener.factory.doStop)
        with open(path, "w") as f:
            f.write(template.format(inner="after"))
        self.assertTrue(self.successResultOf(service.reload()))
        one_connection(listener.factory, b"x")
        self.assertEqual(metrics.value(ENDED, rule="after", outcome="handed_off"), 1)

    def test_admin_site_as_a_rule_shows_the_factories_of_the_default_service(self) -> None:
        """admin_site() with no arguments, as a rule of a listener of a MuxService() built with no metrics, shows it."""
        service = MuxService(reactor=Clock())
        factory = SniffingFactory(
            [Rule(Prefix(b"GET"), admin_site(), name="admin"), Rule(Any(), echo(), name="shown-by-admin")],
            reactor=Clock(),
        )
        service.add_listener("tcp:0:interface=127.0.0.1", factory)
        self.addCleanup(factory.doStop)
        one_connection(factory, b"x")
        request = DummyRequest([b"worker", b"status.json"])
        site = admin_site()
        body = site.getResourceFor(request).render(request)
        assert isinstance(body, bytes)
        rules = [r["name"] for listener in json.loads(body)["listeners"] for r in listener["rules"]]
        self.assertIn("shown-by-admin", rules)


class UDPCountedWhereTheOwnerSaysTests(unittest.TestCase):
    def test_building_a_udp_mux_imports_no_metrics(self) -> None:
        """Building a UDPMux with no metrics loads neither muxtwist.metrics nor prometheus_client."""
        code = (
            "from twisted.internet.protocol import DatagramProtocol\n"
            "from muxtwist.matchers import Prefix\n"
            "from muxtwist.sniffing import Rule\n"
            "from muxtwist.udp.mux import UDPMux\n"
            "UDPMux([Rule(Prefix(b'x'), DatagramProtocol())])\n"
        )
        self.assertEqual(loaded_after(code), [])

    def test_a_udp_mux_built_without_metrics_is_in_no_global(self) -> None:
        """A UDPMux built with no metrics counts nothing into the process's default Metrics."""
        before = default_metrics().value(ENDED, rule="-", outcome="no_match")
        mux, _, clock = make_mux([Rule(Prefix(b"never", name="udp-alone"), UDPEcho())], metrics=None)
        mux.datagram_received(b"junk", ("10.0.0.1", 1000))
        clock.advance(60)
        self.assertEqual(mux.stats.ended[("-", "no_match")][0], 1)
        self.assertEqual(default_metrics().value(ENDED, rule="-", outcome="no_match") - before, 0)

    def test_service_udp_listeners_count_into_its_metrics(self) -> None:
        """A UDP listener a MuxService builds counts its flows into the service's metrics, which read its flow table."""
        metrics = Metrics()
        service = MuxService(reactor=Clock(), metrics=metrics)
        path = self.mktemp() + ".py"
        with open(path, "w") as f:
            f.write(
                "from twisted.internet.protocol import DatagramProtocol\n"
                "from muxtwist import Rule\n"
                "from muxtwist.matchers import Prefix\n"
                "listeners = {'udp:0:interface=127.0.0.1': [Rule(Prefix(b'hi'), DatagramProtocol(), name='hi')]}\n"
            )
        service.load(load_config(path))
        [listener] = [s for s in service if getattr(s, "description", "").startswith("udp:")]
        mux = listener.factory
        mux.protocol.makeConnection(FakePort())
        mux.datagram_received(b"hi", ("10.0.0.1", 1000))
        self.assertEqual(metrics.value("muxtwist_udp_active_flows", rule="hi"), 1)
        self.assertEqual(metrics.value("muxtwist_udp_flow_table_entries"), 1)
