"""
Tests for muxtwist.sniffing: the exact sniffing semantics of DESIGN.md.
"""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import protocol, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from muxtwist import Outcome, Rule, SniffingFactory, Verdict
from muxtwist.interfaces import ConnectionInfo, IMatcher, IRespondingMatcher, IRetiringFactory
from muxtwist.matchers import Any as AnyMatcher
from muxtwist.matchers import Prefix, RemoteAddress
from muxtwist.testing import MemoryConnection


class Recorder(protocol.Protocol):
    """Records everything that happens to it."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.received = b""

    def connectionMade(self) -> None:
        self.events.append("made")

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("data", data))
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.events.append("lost")


@implementer(IHalfCloseableProtocol)
class HalfCloseRecorder(Recorder):
    def readConnectionLost(self) -> None:
        self.events.append("read-closed")

    def writeConnectionLost(self) -> None:
        self.events.append("write-closed")


class RecordingFactory(protocol.Factory):
    """Builds recorders and remembers them, and counts starts and stops."""

    def __init__(self, proto: type[Recorder] = Recorder) -> None:
        self.proto = proto
        self.built: list[Recorder] = []
        self.starts = 0
        self.stops = 0

    def startFactory(self) -> None:
        self.starts += 1

    def stopFactory(self) -> None:
        self.stops += 1

    def buildProtocol(self, addr: Any) -> Recorder:
        p = self.proto()
        p.factory = self
        self.built.append(p)
        return p


@implementer(IMatcher)
@attrs.define
class Scripted:
    """A matcher that answers from a table keyed by buffer length, and counts its calls."""

    name: str
    decide: Any
    calls: int = 0
    bytes_seen: int = 0

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        self.calls += 1
        self.bytes_seen += len(data)
        verdict: Verdict = self.decide(data)
        return verdict


def make(rules: list[Rule], **kw: Any) -> tuple[SniffingFactory, task.Clock]:
    clock = task.Clock()
    return SniffingFactory(rules, reactor=clock, **kw), clock


class ReplayTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        stream=st.binary(min_size=1, max_size=3000),
        cuts=st.lists(st.integers(min_value=1, max_value=3000), max_size=40),
        prefix_len=st.integers(min_value=1, max_value=8),
    )
    def test_every_byte_replayed_once_in_order(self, stream: bytes, cuts: list[int], prefix_len: int) -> None:
        """Whatever the chunking, the winner receives exactly the bytes sent, once, in order."""
        target = RecordingFactory()
        rules = [Rule(Prefix(stream[:prefix_len]), target)]
        factory, clock = make(rules)
        conn = MemoryConnection(factory, clock=clock)
        points = sorted({c for c in cuts if c < len(stream)})
        chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
        for chunk in chunks:
            conn.send(chunk)
            clock.advance(0.05)
        self.assertEqual(len(target.built), 1)
        self.assertEqual(target.built[0].received, stream)
        self.assertEqual(target.built[0].events[0], "made")

    def test_replay_is_one_call_then_straight_from_transport(self) -> None:
        """The buffer arrives in one dataReceived; later data reaches the winner directly."""
        target = RecordingFactory()
        factory, clock = make([Rule(Prefix(b"HELLO"), target)])
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"HE")
        conn.send(b"LLO world")
        winner = target.built[0]
        self.assertIs(conn.transport.protocol, winner)
        conn.send(b"more")
        self.assertEqual(winner.events, ["made", ("data", b"HELLO world"), ("data", b"more")])


class PriorityTests(unittest.TestCase):
    def test_earlier_need_more_holds_back_later_match(self) -> None:
        """An earlier undecided rule holds back a later rule that already matches."""
        first, second = RecordingFactory(), RecordingFactory()
        factory, clock = make([Rule(Prefix(b"ABCD"), first, name="first"), Rule(Prefix(b"A"), second, name="second")])
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"AB")
        self.assertIsNone(conn.rule_name)
        self.assertEqual(second.built, [])
        conn.send(b"CD")
        self.assertEqual(conn.rule_name, "first")
        self.assertEqual(second.built, [])

    def test_later_rule_wins_once_earlier_says_no(self) -> None:
        """When the earlier rule turns NO_MATCH, the later matching rule gets the connection."""
        first, second = RecordingFactory(), RecordingFactory()
        factory, clock = make([Rule(Prefix(b"ABCD"), first, name="first"), Rule(Prefix(b"A"), second, name="second")])
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"AB")
        conn.send(b"X")
        self.assertEqual(conn.rule_name, "second")
        self.assertEqual(second.built[0].received, b"ABX")

    def test_all_no_match_goes_to_on_no_match(self) -> None:
        """When every rule says NO_MATCH, on_no_match gets the connection."""
        fallback = RecordingFactory()
        factory, clock = make([Rule(Prefix(b"A"), RecordingFactory())], on_no_match=fallback)
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"ZZ")
        self.assertEqual(conn.outcome, Outcome.NO_MATCH)
        self.assertEqual(fallback.built[0].received, b"ZZ")

    def test_no_match_without_fallback_closes(self) -> None:
        """With no on_no_match, an unmatched connection is closed."""
        factory, clock = make([Rule(Prefix(b"A"), RecordingFactory())])
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"Z")
        self.assertFalse(conn.transport.connected)
        self.assertEqual(factory.connections, set())

    def test_address_rule_decides_before_any_byte(self) -> None:
        """A rule that can decide from the address alone hands off at connect, before data."""
        target = RecordingFactory()
        factory, clock = make([Rule(RemoteAddress("192.0.2.0/24"), target)])
        MemoryConnection(factory, clock=clock)
        self.assertEqual(target.built[0].events, ["made"])

    def test_silence_with_only_no_match_rules_waits_for_timeout(self) -> None:
        """Rules that all say NO_MATCH on zero bytes do not send a silent client to on_no_match."""
        greeter, fallback = RecordingFactory(), RecordingFactory()
        factory, clock = make(
            [Rule(RemoteAddress("10.0.0.0/8"), RecordingFactory())], on_timeout=greeter, on_no_match=fallback
        )
        MemoryConnection(factory, clock=clock)
        self.assertEqual(fallback.built, [])
        clock.advance(5)
        self.assertEqual(len(greeter.built), 1)
        self.assertEqual(fallback.built, [])


class FinalEvaluationTests(unittest.TestCase):
    def test_timeout_with_no_bytes_goes_to_on_timeout(self) -> None:
        """A client silent for sniff_timeout goes to on_timeout, exactly at the timeout."""
        greeter = RecordingFactory()
        factory, clock = make([Rule(AnyMatcher(), RecordingFactory())], sniff_timeout=3.0, on_timeout=greeter)
        conn = MemoryConnection(factory, clock=clock)
        clock.advance(2.99)
        self.assertEqual(greeter.built, [])
        clock.advance(0.01)
        self.assertEqual(conn.outcome, Outcome.TIMEOUT)
        self.assertEqual(greeter.built[0].events, ["made"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_timeout_with_some_bytes_does_final_evaluation(self) -> None:
        """At the timeout with bytes buffered, NEED_MORE counts as NO_MATCH and later rules may win."""
        greeter, fallback, second = RecordingFactory(), RecordingFactory(), RecordingFactory()
        waiting = Scripted("waits", lambda d: Verdict.NEED_MORE)
        takes_ab = Scripted("ab", lambda d: Verdict.MATCH if d.startswith(b"AB") else Verdict.NO_MATCH)
        factory, clock = make(
            [Rule(waiting, RecordingFactory()), Rule(takes_ab, second)], on_timeout=greeter, on_no_match=fallback
        )
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"AB")
        self.assertIsNone(conn.rule_name)
        clock.advance(5)
        self.assertEqual(conn.rule_name, "ab")
        self.assertEqual(second.built[0].received, b"AB")
        self.assertEqual(greeter.built, [])

    def test_timeout_with_bytes_and_no_match_goes_to_on_no_match(self) -> None:
        """At the timeout with bytes and nothing matching, on_no_match (not on_timeout) gets them."""
        greeter, fallback = RecordingFactory(), RecordingFactory()
        factory, clock = make([Rule(Prefix(b"ABCDEF"), RecordingFactory())], on_timeout=greeter, on_no_match=fallback)
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"ABC")
        clock.advance(5)
        self.assertEqual(conn.outcome, Outcome.NO_MATCH)
        self.assertEqual(fallback.built[0].received, b"ABC")
        self.assertEqual(greeter.built, [])

    def test_max_sniff_bytes_reached_while_undecided(self) -> None:
        """Reaching max_sniff_bytes undecided does the final evaluation at once."""
        fallback, later = RecordingFactory(), RecordingFactory()
        waiting = Scripted("waits", lambda d: Verdict.NEED_MORE)
        factory, clock = make(
            [Rule(waiting, RecordingFactory()), Rule(AnyMatcher(), later)], max_sniff_bytes=100, on_no_match=fallback
        )
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"x" * 99)
        self.assertIsNone(conn.rule_name)
        conn.send(b"yy")
        self.assertEqual(conn.rule_name, "any")
        self.assertEqual(later.built[0].received, b"x" * 99 + b"yy")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_half_close_while_sniffing_reaches_half_closeable_winner_after_replay(self) -> None:
        """A half-close during sniffing decides, replays, then gives the winner readConnectionLost."""
        target = RecordingFactory(HalfCloseRecorder)
        factory, clock = make([Rule(Prefix(b"ABCDEF"), RecordingFactory(), name="long"), Rule(Prefix(b"AB"), target)])
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"ABC")
        self.assertIsNone(conn.rule_name)
        conn.half_close()
        self.assertEqual(target.built[0].events, ["made", ("data", b"ABC"), "read-closed"])
        self.assertTrue(conn.transport.connected)

    def test_half_close_while_sniffing_closes_for_plain_winner(self) -> None:
        """A winner that cannot half-close gets its replay, then the connection is closed."""
        target = RecordingFactory()
        factory, clock = make([Rule(Prefix(b"ABCDEF"), RecordingFactory(), name="long"), Rule(Prefix(b"AB"), target)])
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"ABC")
        conn.half_close()
        self.assertEqual(target.built[0].events, ["made", ("data", b"ABC"), "lost"])

    def test_connection_lost_while_sniffing_cancels_timers(self) -> None:
        """A client that goes away while sniffing leaves no timer and no registry entry."""
        waiting = Scripted("waits", lambda d: Verdict.NEED_MORE)
        factory, clock = make([Rule(waiting, RecordingFactory())])
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"x" * 2000)
        conn.send(b"y")
        self.assertNotEqual(clock.getDelayedCalls(), [])
        conn.close()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(factory.connections, set())
        self.assertEqual(conn.outcome, Outcome.CLOSED)


class WinnerTests(unittest.TestCase):
    def test_factory_returning_none_closes(self) -> None:
        """A winner whose factory builds no protocol gets the connection closed, counted as rejected."""

        class Refuses(protocol.Factory):
            def buildProtocol(self, addr: Any) -> None:
                return None

        factory, clock = make([Rule(AnyMatcher(), Refuses(), name="refuses")])
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"hi")
        self.assertFalse(conn.transport.connected)
        self.assertEqual(conn.outcome, Outcome.REJECTED)
        self.assertEqual(factory.stats["refuses"].active, 0)
        self.assertEqual(factory.stats["refuses"].total, 1)
        self.assertEqual(factory.connections, set())

    def test_winner_closing_in_connection_made(self) -> None:
        """A winner that closes inside connectionMade gets no replay and the connection ends cleanly."""

        class Closer(Recorder):
            def connectionMade(self) -> None:
                super().connectionMade()
                self.transport.loseConnection()  # type: ignore[union-attr]

        target = RecordingFactory(Closer)
        factory, clock = make([Rule(AnyMatcher(), target, name="closer")])
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"hi")
        self.assertEqual(target.built[0].events, ["made", "lost"])
        self.assertEqual(factory.connections, set())
        self.assertEqual(factory.stats["closer"].active, 0)

    def test_raising_matcher_counts_as_no_match(self) -> None:
        """A matcher that raises is logged and taken as NO_MATCH; the next rule still decides."""

        def boom(data: bytes) -> Verdict:
            raise RuntimeError("broken plugin")

        target = RecordingFactory()
        factory, clock = make([Rule(Scripted("boom", boom), RecordingFactory()), Rule(AnyMatcher(), target)])
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"x")
        self.assertEqual(conn.rule_name, "any")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_active_and_total_counts(self) -> None:
        """Each rule counts its live and total connections."""
        factory, clock = make([Rule(AnyMatcher(), RecordingFactory(), name="r")])
        a, b = MemoryConnection(factory, clock=clock), MemoryConnection(factory, clock=clock)
        a.send(b"1")
        b.send(b"2")
        self.assertEqual((factory.stats["r"].active, factory.stats["r"].total), (2, 2))
        a.close()
        self.assertEqual((factory.stats["r"].active, factory.stats["r"].total), (1, 2))

    def test_max_connections(self) -> None:
        """Connections above max_connections are refused at once."""
        factory, clock = make([Rule(AnyMatcher(), RecordingFactory())], max_connections=1)
        MemoryConnection(factory, clock=clock)
        self.assertIsNone(factory.buildProtocol(None))  # type: ignore[arg-type]


class FactoryLifecycleTests(unittest.TestCase):
    def test_inner_factories_started_and_stopped_once(self) -> None:
        """Each inner factory, even used by several rules, gets doStart and doStop exactly once."""
        shared, other, greeter = RecordingFactory(), RecordingFactory(), RecordingFactory()
        factory, clock = make(
            [
                Rule(Prefix(b"A"), shared, name="a"),
                Rule(Prefix(b"B"), shared, name="b"),
                Rule(Prefix(b"C"), other, name="c"),
            ],
            on_timeout=greeter,
            on_no_match=shared,
        )
        factory.doStart()
        factory.doStart()  # a second port
        factory.doStop()
        self.assertEqual([f.starts for f in (shared, other, greeter)], [1, 1, 1])
        self.assertEqual([f.stops for f in (shared, other, greeter)], [0, 0, 0])
        factory.doStop()
        self.assertEqual([f.stops for f in (shared, other, greeter)], [1, 1, 1])

    def test_new_rules_start_new_factories_and_stop_old(self) -> None:
        """set_rules on a running factory starts factories that come in and stops those that go."""
        old, kept, new = RecordingFactory(), RecordingFactory(), RecordingFactory()
        factory, clock = make([Rule(Prefix(b"A"), old, name="a"), Rule(Prefix(b"B"), kept, name="b")])
        factory.doStart()
        factory.set_rules([Rule(Prefix(b"B"), kept, name="b"), Rule(Prefix(b"C"), new, name="c")])
        self.assertEqual((old.starts, old.stops), (1, 1))
        self.assertEqual((kept.starts, kept.stops), (1, 0))
        self.assertEqual((new.starts, new.stops), (1, 0))


class BoundedWorkTests(unittest.TestCase):
    def test_one_byte_at_a_time_costs_bounded_matcher_work(self) -> None:
        """A client dribbling max_sniff_bytes one byte at a time costs matcher work linear in the bytes."""
        size = 16384
        matcher = Scripted("never", lambda d: Verdict.NEED_MORE)
        factory, clock = make([Rule(matcher, RecordingFactory())], max_sniff_bytes=size)
        conn = MemoryConnection(factory, clock=clock)
        for _ in range(size):
            conn.send(b"x")
        self.assertFalse(conn.sniffer.sniffing)
        # Evaluating every chunk would call it 16385 times over 134 million bytes.
        self.assertLess(matcher.calls, 1100)
        self.assertLess(matcher.bytes_seen, 1_000_000)

    def test_quiet_client_is_evaluated_after_a_pause(self) -> None:
        """Bytes held back from evaluation are evaluated once the client pauses, not at the timeout."""
        target = RecordingFactory()
        wanted = b"z" * 1500
        factory, clock = make([Rule(Prefix(wanted), target)])
        conn = MemoryConnection(factory, clock=clock)
        conn.send(wanted[:1400])
        conn.send(wanted[1400:])
        self.assertIsNone(conn.rule_name)
        clock.advance(0.05)
        self.assertEqual(conn.rule_name, "prefix")
        self.assertEqual(target.built[0].received, wanted)


@implementer(IRespondingMatcher)
@attrs.frozen
class SaysHello:
    """Needs the server to say HELLO before the client says who it is; the client answers OK first."""

    name: str = "hello"

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        if not data.startswith(b"C"):
            return Verdict.NO_MATCH if data else Verdict.NEED_MORE
        return Verdict.MATCH if b"WHO" in data else Verdict.NEED_MORE

    def respond(self, data: bytes, info: ConnectionInfo) -> bytes:
        return b"HELLO" if data else b""

    def filter_replay(self, data: bytes) -> bytes:
        return data.replace(b"OK", b"", 1)


class RespondingMatcherTests(unittest.TestCase):
    def test_declared_bytes_written_once_and_answer_filtered(self) -> None:
        """A responding matcher's bytes are written once, and the client's answer is not replayed."""
        target = RecordingFactory()
        factory, clock = make([Rule(SaysHello(), target)])
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"C")
        conn.send(b"OK")
        conn.send(b"WHO")
        self.assertEqual(conn.transport.value(), b"HELLO")
        self.assertEqual(target.built[0].received, b"CWHO")


class SettingsAnswerTests(unittest.TestCase):
    """The client's ACK of the SETTINGS a header matcher wrote, when it comes after the request headers."""

    def _split_client(self) -> tuple[MemoryConnection, RecordingFactory, task.Clock, bytes, bytes]:
        from muxtwist.matchers import GRPC, HTTP2
        from muxtwist.matchers.http2 import PREFACE, SETTINGS_FRAME
        from tests.matcher_checks import GET_HEADERS, h2_request

        request = h2_request(GET_HEADERS)
        # The client's preface and SETTINGS frame (9 + its 6-byte settings each), then its HEADERS.
        settings_end = len(PREFACE) + 9 + int.from_bytes(request[len(PREFACE) : len(PREFACE) + 3], "big")
        target = RecordingFactory()
        factory, clock = make([Rule(GRPC(), RecordingFactory(), name="grpc"), Rule(HTTP2(), target, name="h2c")])
        conn = MemoryConnection(factory, clock=clock)
        conn.send(request[:settings_end])
        self.assertEqual(conn.transport.value(), SETTINGS_FRAME)
        conn.send(request[settings_end:])
        return conn, target, clock, request, b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"

    def test_ack_after_the_headers_is_not_passed_to_the_winner(self) -> None:
        """A client that sent its request before our SETTINGS reached it acks them after it; the winner gets no ACK."""
        conn, target, clock, request, ack = self._split_client()
        conn.send(ack)
        clock.advance(0.1)
        self.assertEqual(len(target.built), 1)
        self.assertEqual(target.built[0].received, request)

    def test_client_that_never_acks_is_handed_off_at_the_sniff_timeout(self) -> None:
        """A client that never acks our SETTINGS is still handed off, every byte intact, when sniff_timeout expires."""
        conn, target, clock, request, ack = self._split_client()
        clock.advance(5.0)
        self.assertEqual(len(target.built), 1)
        self.assertEqual(target.built[0].received, request)
        conn.send(b"more")
        self.assertEqual(target.built[0].received, request + b"more")


class TLSTransportTests(unittest.TestCase):
    def test_sniffing_inside_tls(self) -> None:
        """A SniffingFactory wrapped in TLSMemoryBIOFactory sniffs the decrypted stream and hands off."""
        from twisted.internet import ssl
        from twisted.protocols.tls import TLSMemoryBIOFactory
        from twisted.test.iosim import connectedServerAndClient

        from tests.certs import make_certificate

        cert = make_certificate("localhost")
        target = RecordingFactory()
        clock = task.Clock()
        sniffing = SniffingFactory([Rule(Prefix(b"SECRET"), target)], reactor=clock)
        server_opts = ssl.PrivateCertificate.loadPEM(cert.key_pem + cert.cert_pem).options()
        client_opts = ssl.optionsForClientTLS("localhost", ssl.Certificate.loadPEM(cert.cert_pem))

        class Sender(protocol.Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"SEC")  # type: ignore[union-attr]
                self.transport.write(b"RET payload")  # type: ignore[union-attr]

        server_factory = TLSMemoryBIOFactory(server_opts, False, sniffing, clock=clock)
        client_factory = TLSMemoryBIOFactory(client_opts, True, protocol.Factory.forProtocol(Sender), clock=clock)
        client, server, pump = connectedServerAndClient(
            lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None)
        )
        for _ in range(5):
            pump.flush()
            clock.advance(0)
        self.assertEqual(len(target.built), 1)
        self.assertEqual(target.built[0].received, b"SECRET payload")
        self.assertIs(server.wrappedProtocol, target.built[0])


class ForwardingTransportTests(unittest.TestCase):
    def test_transport_without_protocol_attribute_forwards(self) -> None:
        """On a transport the winner cannot be swapped into, the sniffer passes data on with one call."""
        target = RecordingFactory(HalfCloseRecorder)
        factory, clock = make([Rule(Prefix(b"AB"), target)])
        transport = StringTransport()
        sniffer = factory.buildProtocol(None)  # type: ignore[arg-type]
        assert sniffer is not None
        sniffer.makeConnection(transport)
        sniffer.dataReceived(b"AB")
        sniffer.dataReceived(b"C")
        sniffer.readConnectionLost()
        self.assertEqual(target.built[0].events, ["made", ("data", b"AB"), ("data", b"C"), "read-closed"])
        sniffer.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(factory.connections, set())


def _dribble(sniff_timeout: float, head: int = 15000, every: float = 0.021) -> tuple[int, int, bool]:
    """A client that sends ``head`` bytes, then one byte every ``every`` seconds: (bytes scanned, calls, decided)."""
    matcher = Scripted("never", lambda d: Verdict.NEED_MORE)
    factory, clock = make([Rule(matcher, RecordingFactory())], sniff_timeout=sniff_timeout)
    conn = MemoryConnection(factory, clock=clock)
    conn.send(b"x" * head)
    steps = 0
    while conn.sniffer.sniffing and steps < 20_000:
        clock.advance(every)
        conn.send(b"y")
        steps += 1
    return matcher.bytes_seen, matcher.calls, not conn.sniffer.sniffing


class DribblerWorkTests(unittest.TestCase):
    def test_dribbler_work_bounded_whatever_the_timeout(self) -> None:
        """15 KB then one byte every 21 ms costs matcher work within a constant times max_sniff_bytes, at 5 or 60 s."""
        from muxtwist.sniffing import max_matcher_work

        bound = max_matcher_work(16384)
        self.assertLessEqual(bound, 12 * 16384)
        for timeout in (5.0, 60.0):
            scanned, calls, decided = _dribble(timeout)
            self.assertTrue(decided)
            # Before: 3.6 MB at 5 s and 21.7 MB at 60 s.
            self.assertLessEqual(scanned, bound, (timeout, scanned, calls))

    def test_any_pace_stays_within_the_bound(self) -> None:
        """Dribbling at paces around the quiet delay never scans more than the documented bound."""
        from muxtwist.sniffing import max_matcher_work

        for every in (0.001, 0.019, 0.02, 0.021, 0.05, 0.3):
            for head in (0, 900, 1100, 8000):
                scanned, _, decided = _dribble(60.0, head=head, every=every)
                self.assertTrue(decided)
                self.assertLessEqual(scanned, max_matcher_work(16384), (every, head))

    def test_pause_is_detected_after_the_last_byte(self) -> None:
        """The quiet evaluation waits for QUIET_DELAY after the last byte, not after the first held one."""
        from muxtwist.sniffing import QUIET_DELAY

        target = RecordingFactory()
        wanted = b"z" * 1500
        matcher = Scripted("whole", lambda d: Verdict.MATCH if len(d) == 1500 else Verdict.NEED_MORE)
        factory, clock = make([Rule(matcher, target)])
        conn = MemoryConnection(factory, clock=clock)
        conn.send(wanted[:1400])
        calls = matcher.calls
        for i in range(1400, 1500, 10):
            clock.advance(QUIET_DELAY * 0.75)
            conn.send(wanted[i : i + 10])
        self.assertEqual(matcher.calls, calls)  # no evaluation while bytes keep coming
        clock.advance(QUIET_DELAY)
        self.assertEqual(matcher.calls, calls + 1)
        self.assertEqual(conn.rule_name, "whole")
        self.assertEqual(target.built[0].received, wanted)


class SniffCapTests(unittest.TestCase):
    def test_one_big_read_decides_on_max_sniff_bytes_and_delivers_the_rest(self) -> None:
        """A 64 KiB read is decided on its first max_sniff_bytes; the winner still receives all of it, in order."""
        seen: list[int] = []

        def waits(data: bytes) -> Verdict:
            seen.append(len(data))
            return Verdict.NEED_MORE

        target = RecordingFactory()
        factory, clock = make(
            [Rule(Scripted("waits", waits), RecordingFactory()), Rule(AnyMatcher(), target)], max_sniff_bytes=1000
        )
        conn = MemoryConnection(factory, clock=clock)
        stream = bytes(range(256)) * 256
        conn.send(stream[:10])
        conn.send(stream[10:])
        self.assertEqual(max(seen), 1000)
        self.assertEqual(conn.rule_name, "any")
        self.assertEqual(target.built[0].received, stream)
        self.assertEqual(conn.sniffer._bytes_in, 1000)
        conn.send(b"after")
        self.assertEqual(target.built[0].received, stream + b"after")


class ReloadLifecycleTests(unittest.TestCase):
    def test_outgoing_factory_stops_when_its_last_connection_ends(self) -> None:
        """A factory that goes out on reload keeps running until its last connection ends, then stops once."""
        old, new = RecordingFactory(), RecordingFactory()
        factory, clock = make([Rule(Prefix(b"A"), old, name="a")])
        factory.doStart()
        handed = MemoryConnection(factory, clock=clock)
        handed.send(b"A1")
        sniffing = MemoryConnection(factory, clock=clock)
        factory.set_rules([Rule(Prefix(b"A"), new, name="a")])
        self.assertEqual((old.starts, old.stops, new.starts), (1, 0, 1))
        handed.close()
        self.assertEqual(old.stops, 0)  # a connection sniffed under the old rules may still pick it
        sniffing.send(b"A2")
        self.assertEqual(old.built[1].received, b"A2")
        self.assertEqual(old.stops, 0)
        sniffing.close()
        self.assertEqual((old.starts, old.stops), (1, 1))
        self.assertEqual((new.starts, new.stops), (1, 0))

    def test_stopping_keeps_inner_factories_until_connections_end(self) -> None:
        """When the last port stops using the sniffer, inner factories with live connections stop as those end."""
        busy, idle = RecordingFactory(), RecordingFactory()
        factory, clock = make([Rule(Prefix(b"B"), busy, name="b"), Rule(Prefix(b"I"), idle, name="i")])
        factory.doStart()
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"B")
        factory.doStop()
        self.assertEqual((busy.stops, idle.stops), (0, 1))
        conn.close()
        self.assertEqual((busy.stops, idle.stops), (1, 1))

    def test_factory_back_in_use_is_not_started_twice(self) -> None:
        """A factory that goes out and comes back before its connections end is neither stopped nor started again."""
        f = RecordingFactory()
        factory, clock = make([Rule(Prefix(b"A"), f, name="a")])
        factory.doStart()
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"A")
        factory.set_rules([])
        factory.set_rules([Rule(Prefix(b"A"), f, name="a")])
        conn.close()
        self.assertEqual((f.starts, f.stops), (1, 0))
        factory.doStop()
        self.assertEqual((f.starts, f.stops), (1, 1))


@implementer(IRetiringFactory)
class RetiringFactory(RecordingFactory):
    """A recording factory told when the rules stop naming it; ``fail`` makes that raise."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.told = 0
        self.fail = fail

    def retiring(self) -> None:
        self.told += 1
        if self.fail:
            raise RuntimeError("retiring failed")


class RetiringTests(unittest.TestCase):
    def test_a_factory_left_out_by_new_rules_is_told_once_before_it_stops(self) -> None:
        """A reload leaving a factory out tells it so at once, once, while its connection goes on; doStop follows."""
        old, new = RetiringFactory(), RetiringFactory()
        factory, clock = make([Rule(Prefix(b"A"), old, name="a")])
        factory.doStart()
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"A1")
        factory.set_rules([Rule(Prefix(b"A"), new, name="a")])
        self.assertEqual((old.told, old.stops), (1, 0))
        factory.set_rules([Rule(Prefix(b"B"), new, name="b")])
        self.assertEqual(old.told, 1)
        conn.close()
        self.assertEqual((old.told, old.stops, new.told), (1, 1, 0))

    def test_a_factory_named_again_is_told_again_when_left_out_again(self) -> None:
        """Each time the rules stop naming a factory it is told, including after a reload brought it back."""
        f = RetiringFactory()
        factory, clock = make([Rule(Prefix(b"A"), f, name="a")])
        factory.doStart()
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"A")
        factory.set_rules([])
        factory.set_rules([Rule(Prefix(b"A"), f, name="a")])
        factory.set_rules([])
        self.assertEqual(f.told, 2)
        conn.close()

    def test_the_last_port_stopping_tells_every_factory(self) -> None:
        """When the last port stops using the sniffer, every inner factory is told it is retiring, once."""
        a, b = RetiringFactory(), RetiringFactory()
        factory, clock = make([Rule(Prefix(b"A"), a, name="a")], on_no_match=b)
        factory.doStart()
        self.assertEqual((a.told, b.told), (0, 0))
        factory.doStop()
        self.assertEqual((a.told, b.told), (1, 1))
        self.assertEqual((a.stops, b.stops), (1, 1))

    def test_a_factory_that_raises_when_told_is_logged_and_the_reload_goes_on(self) -> None:
        """An exception from retiring() is logged; the reload still installs the new rules and starts theirs."""
        old, new = RetiringFactory(fail=True), RetiringFactory()
        factory, clock = make([Rule(Prefix(b"A"), old, name="a")])
        factory.doStart()
        factory.set_rules([Rule(Prefix(b"A"), new, name="a")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual((old.told, old.stops, new.starts), (1, 1, 1))

    def test_a_nested_sniffer_left_out_tells_each_of_its_factories_once(self) -> None:
        """A nested SniffingFactory the outer rules leave out tells its rules' and fallbacks' factories once each."""
        web, other = RetiringFactory(), RetiringFactory()
        nested = SniffingFactory(
            [Rule(Prefix(b"A"), web, name="a"), Rule(Prefix(b"B"), web, name="b")],
            on_no_match=other,
            reactor=task.Clock(),
        )
        self.assertTrue(IRetiringFactory.providedBy(nested))
        factory, clock = make([Rule(AnyMatcher(), nested, name="nested")])
        factory.doStart()
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"A")
        factory.set_rules([])
        self.assertEqual((web.told, other.told), (1, 1))
        self.assertEqual((web.stops, other.stops), (0, 0))
        conn.close()
        # The nested sniffer's doStop (its last connection ended) stops them without telling them again.
        self.assertEqual((web.told, other.told, web.stops, other.stops), (1, 1, 1, 1))

    def test_a_connection_handed_to_a_factory_after_it_was_told_tells_it_again(self) -> None:
        """A connection sniffing at a reload and handed to the left-out factory afterwards makes it be told again."""
        old, kept, new = RetiringFactory(), RetiringFactory(), RetiringFactory()
        factory, clock = make([Rule(Prefix(b"AB"), old, name="a"), Rule(Prefix(b"KL"), kept, name="k")])
        factory.doStart()
        late, named = MemoryConnection(factory, clock=clock), MemoryConnection(factory, clock=clock)
        late.send(b"A")
        named.send(b"K")
        factory.set_rules([Rule(Prefix(b"AB"), new, name="a"), Rule(Prefix(b"KL"), kept, name="k")])
        self.assertEqual((old.told, kept.told), (1, 0))
        late.send(b"B")
        named.send(b"L")
        self.assertEqual(old.built[0].received, b"AB")
        self.assertEqual((old.told, kept.told, new.told), (2, 0, 0))
        late.close()
        self.assertEqual(old.stops, 1)
        named.close()

    def test_a_connection_sniffing_in_a_retired_nested_sniffer_tells_its_winner_again(self) -> None:
        """A connection still sniffing in a nested sniffer when it retires tells its winner again once handed to it."""
        web = RetiringFactory()
        nested = SniffingFactory([Rule(Prefix(b"ABCD"), web, name="inner")], reactor=task.Clock())
        factory, clock = make([Rule(Prefix(b"AB"), nested, name="nested")])
        factory.doStart()
        inside, outside = MemoryConnection(factory, clock=clock), MemoryConnection(factory, clock=clock)
        inside.send(b"ABC")  # handed to the nested sniffer, which waits for more
        outside.send(b"A")  # still sniffing in the outer one
        factory.set_rules([])
        self.assertEqual(web.told, 1)
        inside.send(b"D")
        self.assertEqual(web.told, 2)
        outside.send(b"BCD")
        self.assertEqual(web.told, 3)
        self.assertEqual([p.received for p in web.built], [b"ABCD", b"ABCD"])
        inside.close()
        outside.close()
        self.assertEqual((web.told, web.stops), (3, 1))

    def test_a_nested_sniffer_named_again_tells_no_winner_of_later_connections(self) -> None:
        """Once the outer rules name a retired nested sniffer again, its new connections reach their winner untold."""
        web = RetiringFactory()
        nested = SniffingFactory([Rule(Prefix(b"ABCD"), web, name="inner")], reactor=task.Clock())
        factory, clock = make([Rule(Prefix(b"AB"), nested, name="nested")])
        factory.doStart()
        held = MemoryConnection(factory, clock=clock)
        held.send(b"ABC")
        factory.set_rules([])
        factory.set_rules([Rule(Prefix(b"AB"), nested, name="nested")])
        fresh = MemoryConnection(factory, clock=clock)
        fresh.send(b"ABCD")
        self.assertEqual(web.told, 1)
        held.send(b"D")
        self.assertEqual(web.told, 2)
        held.close()
        fresh.close()


class RefusalLogTests(unittest.TestCase):
    def test_refusals_logged_at_most_once_a_second_with_a_count(self) -> None:
        """A burst of refusals by one limit writes one line per second, the next line saying how many were left out."""
        from twisted.logger import formatEvent, globalLogPublisher

        events: list[Any] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        from muxtwist.metrics import Metrics

        factory, clock = make([Rule(Prefix(b"A"), RecordingFactory())], max_connections=1, metrics=Metrics())
        before = factory.metrics.value("muxtwist_limit_rejections_total", limit="max_connections") or 0
        MemoryConnection(factory, clock=clock)
        for i in range(50):
            self.assertIsNone(factory.buildProtocol(None))  # type: ignore[arg-type]
            if i == 0:
                clock.advance(0.25)  # the refusals go on: the next line comes before the tail would be due
        clock.advance(0.25)
        for _ in range(10):
            factory.buildProtocol(None)  # type: ignore[arg-type]
        lines = [formatEvent(e) for e in events if "refusing" in e.get("log_format", "")]
        self.assertEqual(len(lines), 1)
        clock.advance(0.5)
        factory.buildProtocol(None)  # type: ignore[arg-type]
        lines = [formatEvent(e) for e in events if "refusing" in e.get("log_format", "")]
        self.assertEqual(len(lines), 2)
        self.assertIn("59 more", lines[1])
        after = factory.metrics.value("muxtwist_limit_rejections_total", limit="max_connections")
        self.assertEqual(after - before, 61)

    def test_refusal_lines_say_what_refused_and_how_many_were_left_out(self) -> None:
        """A limit's and the PROXY pre-stage's throttled lines read as before: the reason, then the count left out."""
        from twisted.internet.address import IPv4Address
        from twisted.logger import formatEvent, globalLogPublisher

        from muxtwist._limits import Refusals
        from muxtwist._report import Observers

        events: list[Any] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = task.Clock()
        refusals = Refusals(clock)
        peer = IPv4Address("TCP", "192.0.2.9", 4000)
        for i in range(3):
            refusals.refused(Observers(), peer, "max_connections", 1)
            refusals.refused_header(peer, "no PROXY header")
            if i == 0:
                clock.advance(0.25)  # the next line comes before the tail would be due
        clock.advance(0.75)
        refusals.refused(Observers(), peer, "max_connections", 1)
        refusals.refused_header(peer, "no PROXY header")
        lines = [formatEvent(e) for e in events if "refusing" in e.get("log_format", "")]
        self.assertEqual(
            lines,
            [
                "refusing 192.0.2.9:4000: max_connections (1) reached",
                "refusing 192.0.2.9:4000: no PROXY header",
                "refusing 192.0.2.9:4000: max_connections (1) reached (2 more refused by it since the last line)",
                "refusing 192.0.2.9:4000: no PROXY header (2 more refused by the PROXY pre-stage since the last line)",
            ],
        )


class EndReportTests(unittest.TestCase):
    def _ends_built(self, **kw: Any) -> tuple[SniffingFactory, list[Any]]:
        """One connection handed off and closed; the ConnectionEnd records built for its end."""
        import muxtwist._sniffing_end as end_module

        built: list[Any] = []
        real = end_module.ConnectionEnd

        def recording(**fields: Any) -> Any:
            built.append(real(**fields))
            return built[-1]

        self.patch(end_module, "ConnectionEnd", recording)
        factory, clock = make([Rule(Prefix(b"A"), RecordingFactory())], **kw)
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"AB")
        conn.close()
        return factory, built

    def test_end_nobody_reads_is_not_built(self) -> None:
        """Without metrics and with log_connections off, an end counts in the rule's stats but builds no report."""
        factory, built = self._ends_built(log_connections=False)
        self.assertEqual(built, [])
        self.assertEqual(factory.stats["prefix"].outcomes, {"handed_off": 1})
        self.assertEqual(factory.stats["prefix"].bytes_in, 2)

    def test_end_is_built_for_its_readers(self) -> None:
        """The end is reported to the log by default, and to metrics with the log off."""
        from muxtwist.metrics import Metrics

        _, built = self._ends_built()
        self.assertEqual([(e.rule, e.outcome) for e in built], [("prefix", "handed_off")])
        factory, built = self._ends_built(log_connections=False, metrics=Metrics())
        self.assertEqual(len(built), 1)
        self.assertEqual(factory.metrics.value("muxtwist_connections_total", rule="prefix", outcome="handed_off"), 1)


class ProxiedWinnerTests(unittest.TestCase):
    def test_end_of_a_winner_that_swaps_its_inner_protocol_is_seen(self) -> None:
        """A proxyForInterface winner that replaces its inner protocol (twisted.web on h2) still ends its record."""
        from twisted.internet.interfaces import IProtocol
        from twisted.python.components import proxyForInterface

        class Swapping(proxyForInterface(IProtocol, "_inner")):  # type: ignore[misc]
            def dataReceived(self, data: bytes) -> None:
                fresh = Recorder()
                fresh.makeConnection(self._inner.transport)
                self._inner = fresh
                fresh.dataReceived(data)

        class Builds(protocol.Factory):
            def buildProtocol(self, addr: Any) -> Any:
                return Swapping(Recorder())

        factory, clock = make([Rule(AnyMatcher(), Builds(), name="web")])
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"PRI * HTTP/2.0")
        conn.send(b"more")
        self.assertEqual(factory.stats["web"].active, 1)
        conn.close()
        self.assertEqual(factory.connections, set())
        self.assertEqual(factory.stats["web"].active, 0)
