"""
The tail of a burst of refusals, for every user of
:class:`muxtwist._text.BurstLog`: a burst followed by quiet gets one line
counting those left out, within a second of the last, and a stop logs what
is pending at once and leaves no timer behind. On a Clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.test.proto_helpers import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from muxtwist.interfaces import ConnectionInfo
from muxtwist.matchers import Prefix
from muxtwist.metrics import EmfileThrottle, Metrics
from muxtwist.proxy import Proxy
from muxtwist.sniffing import Rule, SniffingFactory
from muxtwist.testing import MemoryConnection
from muxtwist.tls import TerminateTLS
from tests.test_tls import Recorder, cert_dir, pki
from tests.udp_helpers import Echo, make_mux

CLIENT = IPv4Address("TCP", "192.0.2.9", 4000)


def capture(case: unittest.TestCase) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    case.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def lines(events: list[dict[str, Any]], *words: str) -> list[str]:
    """The formatted events whose format holds one of ``words``."""
    return [formatEvent(e) for e in events if any(w in e.get("log_format", "") for w in words)]


class SnifferRefusalTailTests(unittest.TestCase):
    def setUp(self) -> None:
        self.events = capture(self)
        self.clock = Clock()
        self.factory = SniffingFactory(
            [Rule(Prefix(b"A"), Recorder(), name="a")], max_connections=1, reactor=self.clock, metrics=Metrics()
        )
        MemoryConnection(self.factory, clock=self.clock, peer=IPv4Address("TCP", "192.0.2.1", 1))

    def refuse(self, n: int) -> None:
        for i in range(n):
            self.assertIsNone(self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.9", 4000 + i)))

    def test_burst_then_quiet_logs_the_count_left_out(self) -> None:
        """Five refusals by max_connections, then quiet: one line at once, one a second later counting four."""
        self.refuse(5)
        self.assertEqual(len(lines(self.events, "refus")), 1)
        self.clock.advance(1.0)
        self.assertEqual(
            lines(self.events, "refus")[1:],
            ["refused 4 more clients since the last line: max_connections (1) reached (the last: 192.0.2.9:4004)"],
        )
        self.clock.advance(10)
        self.assertEqual(len(lines(self.events, "refus")), 2)

    def test_listener_stop_logs_the_pending_count_and_leaves_no_timer(self) -> None:
        """The factory's last stop logs the count still pending at once; no refusal line comes later."""
        self.factory.doStart()
        self.refuse(3)
        self.factory.doStop()
        self.assertEqual(len(lines(self.events, "refus")), 2)
        self.assertIn("refused 2 more clients", lines(self.events, "refus")[1])
        self.clock.advance(10)
        self.assertEqual(len(lines(self.events, "refus")), 2)

    def test_client_path_escaped_once(self) -> None:
        """A refused client's UNIX path is escaped once: an ESC reads \\x1b, not \\\\x1b."""
        self.factory.buildProtocol(UNIXAddress(b"/run/a\x1bb"))  # type: ignore[arg-type]
        self.assertEqual(lines(self.events, "refus"), ["refusing /run/a\\x1bb: max_connections (1) reached"])


class TLSRefusalTailTests(unittest.TestCase):
    def setUp(self) -> None:
        self.events = capture(self)
        self.clock = Clock()
        self.tls = TerminateTLS(cert_dir(self, **{"a.test": pki().a}), Recorder(), max_handshakes=1, reactor=self.clock)
        self.assertIsNotNone(self.tls.buildProtocol(CLIENT))  # the one handshake it may hold

    def refuse(self, n: int) -> None:
        for i in range(n):
            self.assertIsNone(self.tls.buildProtocol(IPv4Address("TCP", "192.0.2.9", 5000 + i)))

    def test_burst_then_quiet_logs_the_count_left_out(self) -> None:
        """Four handshakes refused by max_handshakes, then quiet: a line at once, one a second later counting 3."""
        self.refuse(4)
        self.assertEqual(len(lines(self.events, "refus")), 1)
        self.clock.advance(1.0)
        self.assertEqual(
            lines(self.events, "refus")[1:],
            [
                "refused 3 more handshakes since the last such line: max_handshakes (1) reached"
                " (the last: 192.0.2.9:5003)"
            ],
        )
        self.clock.advance(10)
        self.assertEqual(len(lines(self.events, "refus")), 2)

    def test_refused_client_written_host_port(self) -> None:
        """A refused handshake's client is written host:port, as the sniffer and the proxy write it."""
        self.refuse(1)
        self.assertEqual(
            lines(self.events, "refus"),
            ["refusing 192.0.2.9:5000: max_handshakes (1) reached; 0 more refused since the last such line"],
        )

    def test_stop_logs_the_pending_count_and_leaves_no_timer(self) -> None:
        """Stopping the terminator logs the count still pending at once, and leaves no timer."""
        self.tls.doStart()
        self.refuse(3)
        self.tls.doStop()
        self.assertIn("refused 2 more handshakes", lines(self.events, "refus")[1])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class UDPTailTests(unittest.TestCase):
    def setUp(self) -> None:
        self.events = capture(self)
        self.mux, _, self.clock = make_mux([Rule(Prefix(b"hi", name="greeting"), Echo())])

    def junk(self, n: int) -> None:
        for i in range(n):
            self.mux.datagram_received(b"junk", ("10.0.0.1", 1000 + i))

    def ended(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("transport") == "udp" and "suppressed" in e]

    def test_burst_then_quiet_logs_the_count_left_out(self) -> None:
        """Five junk flows, then quiet: one connection_end line, and a second later one counting the other four."""
        self.junk(5)
        self.assertEqual([e["suppressed"] for e in self.ended()], [0])
        self.clock.advance(1.0)
        tail = self.ended()[1:]
        self.assertEqual([(e["log_event"], e["suppressed"]) for e in tail], [("connection_end_suppressed", 4)])
        self.assertEqual(
            formatEvent(tail[0]),
            "4 more udp flows to port 4433 ended: no_match (no_match), not logged since the last line"
            " (the last: 10.0.0.1:1004, rule -)",
        )
        self.clock.advance(10)
        self.assertEqual(len(self.ended()), 2)

    def test_stop_logs_the_pending_count_and_leaves_no_timer(self) -> None:
        """The mux's last stop logs the count still pending at once, and leaves no timer."""
        self.junk(3)
        self.mux.not_listening()
        self.assertEqual([e["suppressed"] for e in self.ended()], [0, 2])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class EmfileTailTests(unittest.SynchronousTestCase):
    def test_burst_then_quiet_passes_the_count_on(self) -> None:
        """Five clients closed for want of descriptors, then quiet: one line, and a second later one counting four."""
        clock, forwarded = Clock(), []
        throttle = EmfileThrottle(Metrics(), clock, forward=forwarded.append)
        for i in range(5):
            throttle({"log_format": "EMFILE recovery: Closed socket from {address}", "address": f"client-{i}"})
        clock.advance(1.0)
        self.assertEqual([e["suppressed"] for e in forwarded], [0, 4])
        self.assertEqual(
            formatEvent(forwarded[1]),
            "out of file descriptors: closed 4 more waiting clients not logged since the last line"
            " (the last: client-4)",
        )
        self.assertEqual(clock.getDelayedCalls(), [])


class ProxyTailTests(unittest.TestCase):
    def test_refusals_then_quiet_then_stop_leave_no_timer(self) -> None:
        """A full proxy's refusals then quiet log their tail; a stop after more logs it at once, leaving no timer."""
        events = capture(self)
        reactor = MemoryReactorClock()
        proxy = Proxy("tcp:host=127.0.0.1:port=9", reactor=reactor, max_connections=1)
        proxy.doStart()

        def connect(port: int) -> Any:
            info = ConnectionInfo(peer=IPv4Address("TCP", "10.0.0.8", port))
            return proxy.buildProtocolForConnection(None, info, "full")  # type: ignore[arg-type]

        connect(1).makeConnection(StringTransport())  # the one relay it may hold
        for port in range(2, 6):
            self.assertIsNone(connect(port))
        reactor.advance(1.0)
        self.assertEqual(len(lines(events, "max_connections")), 2)
        self.assertIn("refused 3 more clients", lines(events, "max_connections")[1])
        for port in range(6, 9):
            self.assertIsNone(connect(port))
        proxy.doStop()
        self.assertIn("refused 3 more clients", lines(events, "max_connections")[-1])
        self.assertEqual(
            [c for c in reactor.getDelayedCalls() if "FailureLog" in repr(c) or "BurstLog" in repr(c)],
            [],
        )


class _Full(Factory):
    """A rule's factory that builds no protocol (a full TerminateTLS or Proxy says why in lines of its own)."""

    def buildProtocol(self, addr: Any) -> None:
        return None


TAIL_DECLINED = (
    "full declined 9 more clients since the last line: its factory built no protocol (the last: 192.0.2.9:4009)"
)


class DeclinedTailTests(unittest.TestCase):
    def test_declined_clients_logged_once_a_second_with_the_count(self) -> None:
        """Ten clients a rule's factory declines give one line at once and one tail counting nine, not ten lines."""
        events = capture(self)
        clock = Clock()
        factory = SniffingFactory([Rule(Prefix(b"A"), _Full(), name="full")], reactor=clock, log_connections=False)
        for i in range(10):
            MemoryConnection(factory, clock=clock, peer=IPv4Address("TCP", "192.0.2.9", 4000 + i)).send(b"A")
        self.assertEqual(lines(events, "declined"), ["full declined 192.0.2.9:4000: its factory built no protocol"])
        clock.advance(1.0)
        self.assertEqual(
            lines(events, "declined")[1:],
            [TAIL_DECLINED],
        )
        self.assertEqual(clock.getDelayedCalls(), [])
