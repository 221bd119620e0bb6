"""
The UDP flow sniffer in memory: flows, verdicts, replay, limits, timers,
the in-process target's transport, log events and metrics.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from muxtwist.interfaces import Verdict
from muxtwist.matchers import Prefix
from muxtwist.metrics import Metrics
from muxtwist.sniffing import Rule
from muxtwist.udp import IFlowTarget, UDPMux
from muxtwist.udp.flows import Flow, FlowTable

from .udp_helpers import Counting, Echo, Recorder, make_mux

A = ("10.0.0.1", 5000)
B = ("10.0.0.2", 6000)


class ReplayTests(unittest.SynchronousTestCase):
    def test_held_datagrams_replayed_in_order_to_winner(self) -> None:
        """A flow's datagrams held while a matcher said NEED_MORE reach the winner in order, with the flow's address."""
        target = Recorder()
        mux, _, _ = make_mux([Rule(Counting(b"Q", datagrams=3), target)])
        for d in (b"Q1", b"Q2", b"Q3", b"Q4"):
            mux.datagram_received(d, A)
        self.assertEqual(target.got, [(b"Q1", A), (b"Q2", A), (b"Q3", A), (b"Q4", A)])

    def test_only_the_flows_own_datagrams_are_replayed(self) -> None:
        """Datagrams of two interleaved flows are held per flow and each flow's reach its own winner."""
        first, second = Recorder(), Recorder()
        mux, _, _ = make_mux(
            [Rule(Counting(b"X", datagrams=2, name="x"), first), Rule(Counting(b"Y", datagrams=2, name="y"), second)]
        )
        mux.datagram_received(b"X1", A)
        mux.datagram_received(b"Y1", B)
        mux.datagram_received(b"Y2", B)
        mux.datagram_received(b"X2", A)
        self.assertEqual(first.got, [(b"X1", A), (b"X2", A)])
        self.assertEqual(second.got, [(b"Y1", B), (b"Y2", B)])

    def test_matchers_see_concatenation_and_datagrams(self) -> None:
        """A stream matcher sees the concatenated datagrams; the datagram boundaries are in the info."""
        target = Recorder()
        seen: list[Any] = []

        class Spy(Counting):
            def match(self, data: bytes, info: Any) -> Verdict:
                seen.append((data, info.datagrams, info.peer.port, info.local.port))
                return super().match(data, info)

        mux, _, _ = make_mux([Rule(Spy(b"a", datagrams=2), target)])
        mux.datagram_received(b"ab", A)
        mux.datagram_received(b"cd", A)
        self.assertEqual(seen[-1], (b"abcd", (b"ab", b"cd"), 5000, 4433))

    def test_earlier_undecided_rule_keeps_priority(self) -> None:
        """A later rule's MATCH waits while an earlier rule says NEED_MORE, and loses if the earlier one matches."""
        first, second = Recorder(), Recorder()
        mux, _, _ = make_mux(
            [Rule(Counting(b"Z", datagrams=2, name="slow"), first), Rule(Prefix(b"Z", name="fast"), second)]
        )
        mux.datagram_received(b"Z1", A)
        self.assertEqual((first.got, second.got), ([], []))
        mux.datagram_received(b"Z2", A)
        self.assertEqual(len(first.got), 2)
        self.assertEqual(second.got, [])

    def test_sniff_timeout_final_evaluation(self) -> None:
        """At sniff_timeout, NEED_MORE counts as NO_MATCH and a later rule that matches gets the flow."""
        first, second = Recorder(), Recorder()
        mux, _, clock = make_mux(
            [Rule(Counting(b"Z", datagrams=2, name="slow"), first), Rule(Prefix(b"Z", name="fast"), second)],
            sniff_timeout=2.0,
        )
        mux.datagram_received(b"Z1", A)
        clock.advance(1.9)
        self.assertEqual(second.got, [])
        clock.advance(0.2)
        self.assertEqual(second.got, [(b"Z1", A)])
        self.assertEqual(first.got, [])

    def test_max_sniff_datagrams_bounds_need_more(self) -> None:
        """A flow still undecided after max_sniff_datagrams datagrams gets no rule and is remembered as unmatched."""
        matcher = Counting(b"W", datagrams=99)
        target = Recorder()
        mux, _, _ = make_mux([Rule(matcher, target)], max_sniff_datagrams=3)
        for i in range(3):
            mux.datagram_received(b"W%d" % i, A)
        self.assertEqual(target.got, [])
        self.assertEqual(mux.table.unmatched, 1)
        self.assertEqual(len(mux.table.flows), 0)
        calls = matcher.calls
        mux.datagram_received(b"W9", A)
        self.assertEqual(matcher.calls, calls)

    def test_max_sniff_bytes_bounds_what_an_undecided_flow_holds(self) -> None:
        """Once a flow's held datagrams reach max_sniff_bytes the evaluation is final: nothing more is held for it."""
        matcher = Counting(b"W", datagrams=99)
        target = Recorder()
        mux, _, _ = make_mux([Rule(matcher, target)], max_sniff_bytes=1000)
        mux.datagram_received(b"W" * 600, A)
        self.assertEqual(sum(map(len, mux.table.flows[A].held)), 600)
        mux.datagram_received(b"W" * 600, A)
        self.assertEqual(len(mux.table.flows), 0)
        self.assertEqual(mux.table.unmatched, 1)
        self.assertEqual(mux.stats.ended[("-", "no_match")][0], 1)
        big = ("10.0.0.3", 7000)
        mux.datagram_received(b"W" * 65507, big)
        self.assertNotIn(big, mux.table.flows)
        self.assertEqual(target.got, [])

    def test_max_sniff_bytes_comes_from_the_rules_file_settings(self) -> None:
        """build_udp_mux and a reload give the mux the rules file's max_sniff_bytes."""
        from muxtwist.config import Settings
        from muxtwist.udp.listener import build_udp_mux

        mux = build_udp_mux([Rule(Prefix(b"x"), Recorder())], Settings(max_sniff_bytes=2048), reactor=Clock())
        self.assertEqual(mux.max_sniff_bytes, 2048)


class UnmatchedTests(unittest.SynchronousTestCase):
    def test_unmatched_flow_costs_one_evaluation(self) -> None:
        """Junk from one remote is evaluated once; its later datagrams are dropped unseen until unmatched_timeout."""
        matcher = Counting(b"OK")
        mux, _, clock = make_mux([Rule(matcher, Recorder())], unmatched_timeout=10.0)
        for _ in range(50):
            mux.datagram_received(b"junk", A)
        self.assertEqual(matcher.calls, 1)
        self.assertEqual(mux.stats.dropped["unmatched"], 49)
        clock.advance(10.0)
        mux.datagram_received(b"junk", A)
        self.assertEqual(matcher.calls, 2)

    def test_on_no_match_target(self) -> None:
        """With on_no_match, a flow no rule wants goes there, datagrams replayed."""
        fallback = Recorder()
        mux, _, _ = make_mux([Rule(Counting(b"OK"), Recorder())], on_no_match=fallback)
        mux.datagram_received(b"junk", A)
        self.assertEqual(fallback.got, [(b"junk", A)])


class TargetTransportTests(unittest.SynchronousTestCase):
    def test_target_answers_through_listening_socket(self) -> None:
        """transport.write(data, addr) of a target sends from the listening socket to the flow's remote."""
        mux, port, _ = make_mux([Rule(Prefix(b"hi"), Echo())])
        mux.datagram_received(b"hi there", A)
        self.assertEqual(port.sent, [(b"HI THERE", A)])

    def test_target_cannot_write_to_other_addresses(self) -> None:
        """A target's write to an address that is not one of its flows is dropped and counted."""

        class Stray(DatagramProtocol):
            def datagramReceived(self, datagram: bytes, addr: Any) -> None:
                assert self.transport is not None
                self.transport.write(b"x" * 1000, ("192.0.2.9", 53))
                self.transport.write(b"x" * 1000, B)

        mux, port, _ = make_mux([Rule(Prefix(b"hi", name="stray"), Stray()), Rule(Prefix(b"yo"), Echo())])
        mux.datagram_received(b"yo", B)
        mux.datagram_received(b"hi", A)
        self.assertEqual(port.sent, [(b"YO", B)])
        self.assertEqual(mux.stats.dropped["not_a_flow"], 2)

    def test_mux_never_sends_on_its_own(self) -> None:
        """Sniffing, unmatched and evicted flows never cause a datagram to be sent (no amplification)."""
        mux, port, clock = make_mux([Rule(Counting(b"Q", datagrams=3), Recorder())], max_udp_flows=10)
        for i in range(200):
            mux.datagram_received(b"Q" if i % 2 else b"junk", ("10.1.0.1", 1000 + i))
        clock.advance(10)
        self.assertEqual(port.sent, [])

    def test_targets_started_and_stopped(self) -> None:
        """Each target gets startProtocol when the mux starts and stopProtocol when it stops."""
        target = Recorder()
        mux, _, _ = make_mux([Rule(Prefix(b"a"), target)])
        self.assertEqual(target.started, 1)
        mux.protocol.doStop()
        self.assertEqual(target.stopped, 1)

    def test_targets_a_reload_retires_stop_after_their_last_flow(self) -> None:
        """Targets a reload replaces are stopped at once if idle, else when their last flow ends; none accumulate."""
        busy, idle, new = Recorder(), Recorder(), Recorder()
        mux, _, clock = make_mux(
            [Rule(Prefix(b"a", name="a"), busy), Rule(Prefix(b"b", name="b"), idle)], flow_idle_timeout=5.0
        )
        mux.datagram_received(b"a1", A)
        mux.set_rules([Rule(Prefix(b"a", name="a"), new)])
        self.assertEqual((busy.stopped, idle.stopped, new.started), (0, 1, 1))
        mux.datagram_received(b"a2", A)  # the live flow keeps its target
        self.assertEqual(busy.by(A), [b"a1", b"a2"])
        clock.advance(5.1)
        self.assertEqual(busy.stopped, 1)
        for _ in range(5):
            mux.set_rules([Rule(Prefix(b"a", name="a"), Recorder())])
        self.assertEqual(len(mux._targets), 1)
        mux.protocol.doStop()
        self.assertEqual((busy.stopped, idle.stopped), (1, 1))

    def test_reload_whose_target_cannot_start_keeps_the_old_rules(self) -> None:
        """New rules with a target whose startProtocol raises are refused whole: old rules serve, new targets stop."""

        class Broken(Recorder):
            def startProtocol(self) -> None:
                raise RuntimeError("cannot bind its own resources")

        old, fresh = Recorder(), Recorder()
        mux, _, _ = make_mux([Rule(Prefix(b"a", name="a"), old)])
        with self.assertRaises(RuntimeError):
            mux.set_rules([Rule(Prefix(b"a", name="a"), fresh), Rule(Prefix(b"b", name="b"), Broken())])
        self.assertEqual([r.factory for r in mux.rules], [old])
        self.assertEqual((fresh.started, fresh.stopped), (1, 1))
        mux.datagram_received(b"a1", A)
        self.assertEqual(old.by(A), [b"a1"])

    def test_target_on_two_listeners_refused(self) -> None:
        """One DatagramProtocol instance cannot serve two listeners: a clear error."""
        target = Recorder()
        make_mux([Rule(Prefix(b"a"), target)])
        with self.assertRaises(ValueError):
            make_mux([Rule(Prefix(b"a"), target)])

    def test_tcp_factory_refused(self) -> None:
        """A UDP listener's rule whose target is a TCP factory is refused with the rule's name."""
        with self.assertRaises(TypeError) as e:
            UDPMux([Rule(Prefix(b"a", name="web"), Factory.forProtocol(Protocol))], metrics=Metrics())
        self.assertIn("web", str(e.exception))


@implementer(IFlowTarget)
class Tracking(Recorder):
    idle_timeout = 5.0

    def __init__(self) -> None:
        super().__init__()
        self.ended: list[tuple[str, int]] = []

    def flow_ended(self, addr: tuple[str, int]) -> None:
        self.ended.append(addr)


class IdleTests(unittest.SynchronousTestCase):
    def test_idle_flow_ends_and_target_told(self) -> None:
        """A handed-off flow ends after the target's idle_timeout without traffic; the target hears of it."""
        target = Tracking()
        mux, _, clock = make_mux([Rule(Prefix(b"a"), target)])
        mux.datagram_received(b"a", A)
        clock.advance(3)
        mux.datagram_received(b"a2", A)  # traffic pushes the end back
        clock.advance(3)
        self.assertEqual(target.ended, [])
        clock.advance(2.1)
        self.assertEqual(target.ended, [A])
        self.assertEqual(len(mux.table), 0)

    def test_plain_target_uses_listener_idle_timeout(self) -> None:
        """A target without idle_timeout gets the listener's flow_idle_timeout."""
        mux, _, clock = make_mux([Rule(Prefix(b"a"), Recorder())], flow_idle_timeout=7.0)
        mux.datagram_received(b"a", A)
        clock.advance(6.9)
        self.assertEqual(len(mux.table.flows), 1)
        clock.advance(0.2)
        self.assertEqual(len(mux.table.flows), 0)

    def test_end_flow_from_target(self) -> None:
        """A target's transport.end_flow ends only that flow; the next datagram from it starts a new flow."""

        class Once(Tracking):
            def datagramReceived(self, datagram: bytes, addr: Any) -> None:
                super().datagramReceived(datagram, addr)
                if datagram == b"a-bye":
                    self.transport.end_flow(addr, outcome="backend_failed")  # type: ignore[union-attr]

        target = Once()
        matcher = Counting(b"a")
        mux, _, _ = make_mux([Rule(matcher, target)])
        mux.datagram_received(b"a1", A)
        mux.datagram_received(b"a2", B)
        mux.datagram_received(b"a-bye", A)
        self.assertEqual(target.ended, [A])
        self.assertEqual(set(mux.table.flows), {B})
        mux.datagram_received(b"a3", A)
        self.assertEqual(matcher.calls, 3)


class LimitTests(unittest.SynchronousTestCase):
    def test_per_source_limit(self) -> None:
        """Flows from one host beyond max_flows_per_source are refused; other hosts are not."""
        target = Recorder()
        mux, _, _ = make_mux([Rule(Prefix(b"a"), target)], max_flows_per_source=2)
        for port in (1, 2, 3):
            mux.datagram_received(b"a", ("10.0.0.1", port))
        mux.datagram_received(b"a", ("10.0.0.2", 1))
        self.assertEqual(len(target.got), 3)
        self.assertEqual(mux.stats.dropped["max_flows_per_source"], 1)
        self.assertEqual(mux.metrics.value("muxtwist_limit_rejections_total", limit="max_flows_per_source"), 1)

    def test_oldest_sniffing_flow_evicted_when_full(self) -> None:
        """With no unmatched records left, the oldest flow still sniffing makes room; handed-off flows stay."""
        target = Recorder()
        mux, _, _ = make_mux([Rule(Counting(b"Q", datagrams=2), target)], max_udp_flows=3)
        mux.datagram_received(b"Q", A)
        mux.datagram_received(b"Q", A)  # handed off
        mux.datagram_received(b"Q", ("10.0.0.3", 1))
        mux.datagram_received(b"Q", ("10.0.0.4", 1))
        mux.datagram_received(b"Q", ("10.0.0.5", 1))
        self.assertEqual(set(mux.table.flows), {A, ("10.0.0.4", 1), ("10.0.0.5", 1)})

    def test_full_of_handed_off_flows_refuses_new(self) -> None:
        """When every entry is a handed-off flow, a new remote is refused rather than evicting one."""
        mux, _, _ = make_mux([Rule(Prefix(b"a"), Recorder())], max_udp_flows=2)
        for port in (1, 2, 3):
            mux.datagram_received(b"a", ("10.0.0.1", port))
        self.assertEqual(len(mux.table.flows), 2)
        self.assertEqual(mux.stats.dropped["max_udp_flows"], 1)

    def test_spoofed_flood_bounded_and_legitimate_flows_served(self) -> None:
        """100,000 junk datagrams from many source ports keep the table and memory bounded; real flows are served."""
        target = Echo()
        matcher = Counting(b"LEGIT")
        mux, port, _ = make_mux([Rule(matcher, target)], max_udp_flows=1000, log_connections=False)
        mux.datagram_received(b"LEGIT before", A)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for i in range(100_000):
                mux.datagram_received(b"\x00junk", (f"198.51.{i % 200}.{(i // 200) % 250}", 1024 + i % 60000))
                if i == 50_000:
                    mux.datagram_received(b"LEGIT during", B)
            grown = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        self.assertLessEqual(len(mux.table), 1000)
        self.assertLess(grown, 2_000_000)
        mux.datagram_received(b"LEGIT after", A)
        mux.datagram_received(b"LEGIT again", B)
        self.assertEqual(
            port.sent, [(b"LEGIT BEFORE", A), (b"LEGIT DURING", B), (b"LEGIT AFTER", A), (b"LEGIT AGAIN", B)]
        )
        self.assertEqual(matcher.calls, 100_002)


class ReportTests(unittest.SynchronousTestCase):
    def test_connection_end_event_per_flow(self) -> None:
        """Each flow's end is one connection_end event with rule, remote, datagrams and bytes each way and outcome."""
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        mux, _, clock = make_mux([Rule(Prefix(b"hi", name="greeting"), Echo())], flow_idle_timeout=1.0)
        mux.datagram_received(b"hi", A)
        mux.datagram_received(b"hi!!", A)
        mux.datagram_received(b"nope", B)
        clock.advance(1.0)
        ends = [e for e in events if e.get("log_event") == "connection_end" and e.get("transport") == "udp"]
        by_peer = {e["peer"]: e for e in ends}
        self.assertEqual(set(by_peer), {"10.0.0.1:5000", "10.0.0.2:6000"})
        done = by_peer["10.0.0.1:5000"]
        self.assertEqual(
            (done["rule"], done["outcome"], done["reason"], done["datagrams_in"], done["bytes_in"]),
            ("greeting", "handed_off", "idle", 2, 6),
        )
        self.assertEqual((done["datagrams_out"], done["bytes_out"]), (2, 6))
        self.assertAlmostEqual(done["duration"], 1.0)
        self.assertEqual((by_peer["10.0.0.2:6000"]["outcome"], by_peer["10.0.0.2:6000"]["rule"]), ("no_match", "-"))

    def test_unanswered_flow_lines_throttled_under_a_spoofed_flood(self) -> None:
        """10,000 junk flows in a second log two lines, the second counting those left out; served flows log each."""
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        mux, _, clock = make_mux([Rule(Prefix(b"hi", name="greeting"), Echo())], flow_idle_timeout=1.0)
        for i in range(10_000):
            mux.datagram_received(b"junk", (f"10.{i >> 8}.{i & 255}.1", 1000 + i))
            if i == 0:
                clock.advance(0.25)  # the flood goes on: the next line comes before the tail would be due
        clock.advance(0.75)
        mux.datagram_received(b"junk", ("10.99.0.1", 7))
        for port in (1, 2, 3):
            mux.datagram_received(b"hi", ("10.200.0.1", port))
        clock.advance(1.0)
        ends = [e for e in events if e.get("log_event") == "connection_end" and e.get("transport") == "udp"]
        junk = [e for e in ends if e["outcome"] == "no_match"]
        self.assertEqual([e["suppressed"] for e in junk], [0, 9_999])
        self.assertEqual(len([e for e in ends if e["rule"] == "greeting"]), 3)
        self.assertEqual(mux.stats.ended[("-", "no_match")][0], 10_001)

    def test_metrics_series(self) -> None:
        """Ended flows, their datagrams and bytes, live flows and dropped datagrams are Prometheus series."""
        mux, _, clock = make_mux([Rule(Prefix(b"hi", name="greeting"), Echo())], flow_idle_timeout=1.0)
        mux.datagram_received(b"hi", A)
        self.assertEqual(mux.metrics.value("muxtwist_udp_active_flows", rule="greeting"), 1)
        clock.advance(2)
        m = mux.metrics
        self.assertEqual(m.value("muxtwist_udp_flows_total", rule="greeting", outcome="handed_off"), 1)
        self.assertEqual(m.value("muxtwist_udp_datagrams_total", rule="greeting", direction="out"), 1)
        self.assertEqual(m.value("muxtwist_udp_bytes_total", rule="greeting", direction="in"), 2)
        self.assertEqual(m.value("muxtwist_udp_active_flows", rule="greeting"), 0)
        self.assertEqual(m.value("muxtwist_connections_total", rule="greeting", outcome="handed_off"), 1)


class FlowTableTests(unittest.SynchronousTestCase):
    def test_unmatched_records_go_first(self) -> None:
        """A full table drops its oldest unmatched record before any sniffing flow."""
        table = FlowTable(2, None, 30.0)
        old = Flow(addr=A, started=0, last=0)
        table.add(old)
        table.remove(old)
        table.remember_unmatched(A, 0)
        sniffing = Flow(addr=B, started=0, last=0)
        table.add(sniffing)
        refusal, evicted = table.room_for(("10.9.9.9", 1))
        self.assertEqual((refusal, evicted), (None, []))
        self.assertFalse(table.is_unmatched(A, 1))
        self.assertIn(B, table.flows)

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.tuples(st.integers(0, 5), st.sampled_from([b"Q", b"R", b"junk"])), max_size=60),
        st.integers(1, 4),
    )
    def test_every_datagram_reaches_at_most_one_winner_in_order(
        self, sends: list[tuple[int, bytes]], need: int
    ) -> None:
        """For any interleaving, each flow's datagrams reach one target, in order, each at most once, none invented."""
        q, r = Recorder(), Recorder()
        mux, _, _ = make_mux(
            [Rule(Counting(b"Q", datagrams=need, name="q"), q), Rule(Counting(b"R", name="r"), r)],
            max_udp_flows=4,
        )
        sent: dict[tuple[str, int], list[bytes]] = {}
        for n, (who, payload) in enumerate(sends):
            addr = ("10.0.0.1", who)
            data = payload + b"%d" % n
            sent.setdefault(addr, []).append(data)
            mux.datagram_received(data, addr)
        for addr, datagrams in sent.items():
            got_q, got_r = q.by(addr), r.by(addr)
            self.assertFalse(got_q and got_r)
            got = got_q or got_r
            # what a flow's target got is a subsequence of what was sent, in order
            it = iter(datagrams)
            self.assertTrue(all(any(g == d for d in it) for g in got), (got, datagrams))
