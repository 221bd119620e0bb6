"""
``status()`` (what ``/status.json`` and the stats page show) reads proxies
through :class:`~muxtwist.interfaces.IBackendPool` only, never their private
attributes.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer

from muxtwist.admin import render_page, status
from muxtwist.interfaces import BackendState, IBackendPool, RelayState
from muxtwist.matchers import Any
from muxtwist.metrics import Metrics
from muxtwist.sniffing import Rule, SniffingFactory


@implementer(IBackendPool, IProtocolFactory)
class InterfaceOnlyPool(Factory):
    """A pool with nothing but what IBackendPool asks: no backends list, no reactor, no relays set."""

    gave_up = 0
    transparent = False

    def backend_states(self) -> Sequence[BackendState]:
        return [
            BackendState(
                "tcp:host=10.0.0.1:port=80",
                usable=False,
                active=2,
                total=9,
                transparent=0,
                failures=4,
                errors={"refused": 4},
                bytes_in=1000,
                bytes_out=2000,
                checked=True,
                healthy=True,
                since=5.0,
                last_check="passed",
                last_check_at=95.0,
                skipped_until=130.0,
            )
        ]

    def open_relays(self) -> Sequence[RelayState]:
        return [
            RelayState("pool", "tcp:host=10.0.0.1:port=80", 10, 20),
            RelayState("pool", "tcp:host=10.0.0.1:port=80", 1, 2),
            RelayState("other", "tcp:host=10.0.0.1:port=80", 500, 500),
        ]


class StatusThroughInterfaceTests(unittest.TestCase):
    def test_status_reads_a_pool_through_the_interface_only(self) -> None:
        """A pool that has only IBackendPool's methods shows its backends, live bytes and skip on the page."""
        clock, metrics = Clock(), Metrics()
        clock.advance(100)
        pool = InterfaceOnlyPool()
        factory = SniffingFactory(
            [Rule(Any(), pool, name="pool"), Rule(Any(), pool, name="other")], reactor=clock, metrics=metrics
        )
        data = status(None, metrics, clock)
        (listener,) = data["listeners"]
        backends = {b["rule"]: b for b in listener["backends"]}
        self.assertEqual(set(backends), {"pool"})  # one pool, found once, under its first rule
        backend = backends["pool"]
        # Only the relays of this rule: the pool is the factory of two rules.
        self.assertEqual((backend["bytes_in"], backend["bytes_out"]), (1011, 2022))
        self.assertEqual((backend["live"], backend["total"], backend["errors"]), (2, 9, {"refused": 4}))
        self.assertEqual((backend["checked"], backend["healthy"], backend["skipped_until"]), (True, True, 130.0))
        self.assertIn("SKIPPED for 1m35s; after failed connects, for 30s more", render_page(data).decode())
        self.assertEqual(metrics.factories, [factory])


class AgeTests(unittest.TestCase):
    def test_ages_on_the_page(self) -> None:
        """Ages read in the two largest units, each smaller one padded to two digits, never negative."""
        from muxtwist._admin_page import _fmt_age

        cases = {
            -5: "0s",
            0: "0s",
            59.9: "59s",
            60: "1m00s",
            3599: "59m59s",
            3600: "1h00m",
            86399: "23h59m",
            86400: "1d00h",
            90061: "1d01h",
            400 * 86400: "400d00h",
        }
        self.assertEqual({s: _fmt_age(s) for s in cases}, cases)
