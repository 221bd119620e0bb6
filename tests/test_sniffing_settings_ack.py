"""
The SETTINGS a GRPC()/HTTP2Header() rule writes, and the client's ACK of it,
under random timing: a real ``h2`` client (one that waits for the server's
SETTINGS before its request, or one that does not) whose bytes reach a
SniffingFactory on a Clock split at random offsets, with random pauses, and
which reads what the sniffer wrote at random moments.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.trial import unittest

from muxtwist import Outcome, Rule, SniffingFactory
from muxtwist.interfaces import IMatcher
from muxtwist.matchers import GRPC, HTTP2, HTTP2Header
from muxtwist.matchers.http2 import SETTINGS_FRAME
from muxtwist.sniffing import QUIET_DELAY
from muxtwist.testing import MemoryConnection
from tests.matcher_checks import GET_HEADERS, GRPC_HEADERS
from tests.test_sniffing import RecordingFactory

SNIFF_TIMEOUT = 30.0
ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"


class _Client:
    """An ``h2`` prior-knowledge client: ``stream`` is every byte it sends, ``ack_at`` where its ACK is in it."""

    def __init__(self, headers: list[tuple[str, str]], body: bytes, waits: bool, window: int) -> None:
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.headers, self.body, self.waits = headers, body, waits
        self.h2.initiate_connection()
        if window:
            self.h2.increment_flow_control_window(window)
        self.stream = self.h2.data_to_send()
        self.delivered = 0
        self.read = 0
        self.ack_at: int | None = None
        self.requested = False
        if not waits:
            self._request()

    def _request(self) -> None:
        self.requested = True
        self.h2.send_headers(1, self.headers, end_stream=not self.body)
        for at in range(0, len(self.body), 16384):
            self.h2.send_data(1, self.body[at : at + 16384], end_stream=at + 16384 >= len(self.body))
        self.stream += self.h2.data_to_send()

    def receive(self, written: bytes) -> None:
        """Read what the server wrote since the last read; ack it, and make the request if it was waiting."""
        new, self.read = written[self.read :], len(written)
        if not new:
            return
        events = self.h2.receive_data(new)
        out = self.h2.data_to_send()
        if any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events):
            assert out == ACK, out
            self.ack_at = len(self.stream)
        self.stream += out
        if self.waits and not self.requested:
            self._request()

    def expected(self) -> bytes:
        """What the winner must get: every byte sent, but the ACK of our SETTINGS."""
        if self.ack_at is None:
            return self.stream
        return self.stream[: self.ack_at] + self.stream[self.ack_at + len(ACK) :]


_steps = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(1, 200)),
        st.tuples(st.just("read"), st.just(0)),
        st.tuples(st.just("pause"), st.sampled_from([0, 1, 5, 19, 20, 21, 50, 300])),
    ),
    max_size=40,
)


class SettingsAnswerModelTests(unittest.TestCase):
    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        grpc=st.booleans(),
        header_rule=st.booleans(),
        waits=st.booleans(),
        window=st.sampled_from([0, 1 << 20]),
        body_size=st.sampled_from([0, 10, 3000]),
        steps=_steps,
    )
    def test_winner_never_gets_the_ack_and_no_acking_client_waits(
        self, grpc: bool, header_rule: bool, waits: bool, window: int, body_size: int, steps: list[tuple[str, int]]
    ) -> None:
        """Any split or timing: the winner gets all but the ACK of our SETTINGS; no acking client waits to time out."""
        matcher: IMatcher = HTTP2Header(":path", prefix="/") if header_rule else GRPC()
        first, second = RecordingFactory(), RecordingFactory()
        factory = SniffingFactory(
            [Rule(matcher, first, name="first"), Rule(HTTP2(), second, name="h2c")],
            sniff_timeout=SNIFF_TIMEOUT,
            reactor=(clock := task.Clock()),
        )
        factory.doStart()
        conn = MemoryConnection(factory, clock=clock)
        client = _Client(GRPC_HEADERS if grpc else GET_HEADERS, b"x" * body_size, waits, window)

        def deliver(n: int) -> None:
            chunk = client.stream[client.delivered : client.delivered + n]
            client.delivered += len(chunk)
            if chunk:
                conn.send(chunk)

        for kind, arg in steps:
            if kind == "send":
                deliver(arg)
            elif kind == "read":
                client.receive(conn.transport.value())
            else:
                clock.advance(arg / 1000)
        # Then the network delivers everything, the client reads everything, until neither has more to say.
        for _ in range(10):
            deliver(len(client.stream))
            clock.advance(QUIET_DELAY * 2)
            client.receive(conn.transport.value())
            if client.delivered == len(client.stream):
                break
        self.assertLess(clock.seconds(), SNIFF_TIMEOUT)
        written = conn.transport.value()
        self.assertIn(written, (b"", SETTINGS_FRAME))
        self.assertEqual(client.ack_at is not None, written == SETTINGS_FRAME)
        # Every client asked for its first request here, and acked what it got: nothing may wait for sniff_timeout.
        self.assertFalse(conn.sniffer.sniffing, "a connection whose client acked waits for sniff_timeout")
        self.assertEqual(conn.outcome, Outcome.HANDED_OFF)
        winners: list[Any] = first.built + second.built
        self.assertEqual(len(winners), 1)
        self.assertEqual(winners[0].received, client.expected())
        conn.close()
        factory.doStop()
