"""
A stateful model test of SniffingProtocol: hypothesis drives one connection
after another through a real SniffingFactory on a Clock, with chunks of 1
byte to 64 KiB, pauses of any length, half-closes, client closes, server
aborts, the PROXY pre-stage (trusted and untrusted peers), timeouts and
reloads mid-connection, and checks the sniffing contract after every step.
"""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from muxtwist import Outcome, SniffingFactory, Verdict
from muxtwist import Rule as MuxRule
from muxtwist._text import BurstLog
from muxtwist.interfaces import ConnectionEnd, ConnectionInfo, IMatcher
from muxtwist.matchers.proxy_protocol import build_v1
from muxtwist.metrics import Metrics
from muxtwist.sniffing import max_matcher_work
from muxtwist.testing import MemoryConnection
from tests.test_sniffing import HalfCloseRecorder, RecordingFactory

TRUSTED_PEER = IPv4Address("TCP", "10.0.0.1", 5000)
UNTRUSTED_PEER = IPv4Address("TCP", "192.0.2.1", 5000)
HEADER = build_v1(("198.51.100.7", 40000), ("10.0.0.1", 443))

#: How a chunk may start; the rest of it is filler that decides nothing.
TOKENS = [b"W", b"L", b"B", b"\n", b"x", b"P", b"PR", b"PROXY ", b"\r\n", b""]


@implementer(IMatcher)
@attrs.define(eq=False)
class Counting:
    """
    A matcher by first byte: ``first`` then ``decide(data)``; NO_MATCH for
    other bytes, ``on_empty`` on none. Counts the bytes it is shown.
    """

    name: str
    first: bytes
    on_empty: Verdict
    complete: Any
    scanned: int = 0

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        self.scanned += len(data)
        if not data:
            return self.on_empty
        if not data.startswith(self.first):
            return Verdict.NO_MATCH
        verdict: Verdict = self.complete(data)
        return verdict


def _matchers() -> list[Counting]:
    return [
        # Waits for ever once it sees a W: only the cap, the FIN or the timeout decide.
        Counting("waits", b"W", Verdict.NO_MATCH, lambda d: Verdict.NEED_MORE),
        # A line protocol: decided at its first newline.
        Counting("line", b"L", Verdict.NEED_MORE, lambda d: Verdict.MATCH if b"\n" in d else Verdict.NEED_MORE),
        Counting("b", b"B", Verdict.NO_MATCH, lambda d: Verdict.MATCH),
    ]


class _RecordingMetrics(Metrics):
    """Metrics that also keep every ConnectionEnd the sniffer reports."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry

        super().__init__(CollectorRegistry())
        self.ends: list[ConnectionEnd] = []

    def connection_end(self, end: ConnectionEnd) -> None:
        self.ends.append(end)
        super().connection_end(end)


class SnifferMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = task.Clock()
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.matchers = _matchers()
        self.factories: list[RecordingFactory] = []
        self.factory: SniffingFactory | None = None
        self.conn: MemoryConnection | None = None
        self.ended_before = 0
        self.logged_before = 0
        self.metrics = _RecordingMetrics()

    def teardown(self) -> None:
        try:
            if self.conn is not None:
                self.conn.close()
            if self.factory is not None:
                self.factory.doStop()
                for f in self.factories:
                    assert (f.starts, f.stops) == (1, 1), (f, f.starts, f.stops)
        finally:
            globalLogPublisher.removeObserver(self.events.append)

    def _fresh_rules(self, fallbacks: bool = True) -> tuple[list[MuxRule], dict[str, Any]]:
        made = [RecordingFactory(HalfCloseRecorder) for _ in range(5)]
        self.factories.extend(made)
        rules = [MuxRule(m, f, name=m.name) for m, f in zip(self.matchers, made, strict=False)]
        fallback = {"on_timeout": made[3], "on_no_match": made[4]} if fallbacks else {}
        if not fallbacks:
            for f in made[3:]:
                self.factories.remove(f)
        return rules, fallback

    @initialize(
        max_sniff_bytes=st.sampled_from([16, 100, 1024, 5000, 16384]),
        sniff_timeout=st.sampled_from([0.05, 1.0, 5.0, 60.0]),
        proxy=st.booleans(),
    )
    def start(self, max_sniff_bytes: int, sniff_timeout: float, proxy: bool) -> None:
        rules, fallback = self._fresh_rules()
        self.factory = SniffingFactory(
            rules,
            max_sniff_bytes=max_sniff_bytes,
            sniff_timeout=sniff_timeout,
            accept_proxy_protocol=["10.0.0.0/8"] if proxy else None,
            reactor=self.clock,
            metrics=self.metrics,
            **fallback,
        )
        self.factory.doStart()

    # One connection at a time.

    @precondition(lambda self: self.conn is None)
    @rule(trusted=st.booleans())
    def connect(self, trusted: bool) -> None:
        assert self.factory is not None
        for m in self.matchers:
            m.scanned = 0
        self.ended_before = self._ended_events()
        self.logged_before = self._logged_ends()
        self.trusted = trusted and self.factory.accept_proxy_protocol is not None
        self.header_sent = 0
        self.payload = b""
        self.half_closed = False
        self.conn = MemoryConnection(self.factory, clock=self.clock, peer=TRUSTED_PEER if trusted else UNTRUSTED_PEER)

    def _open(self) -> bool:
        return self.conn is not None and self.conn.transport.connected and not self.half_closed

    @precondition(lambda self: self._open() and self.trusted and self.header_sent < len(HEADER))
    @rule(upto=st.integers(1, len(HEADER)))
    def send_header(self, upto: int) -> None:
        assert self.conn is not None
        upto = max(upto, self.header_sent + 1)
        self.conn.send(HEADER[self.header_sent : upto])
        self.header_sent = upto

    @precondition(lambda self: self._open() and (not self.trusted or self.header_sent == len(HEADER)))
    @rule(
        token=st.sampled_from(TOKENS),
        size=st.one_of(st.integers(0, 8), st.integers(0, 2000), st.integers(0, 65536)),
    )
    def send(self, token: bytes, size: int) -> None:
        assert self.conn is not None
        chunk = (token + b"w" * size)[:65536] or b"w"
        self.conn.send(chunk)
        self.payload += chunk

    @precondition(lambda self: self.conn is not None)
    @rule(seconds=st.one_of(st.sampled_from([0.001, 0.019, 0.02, 0.021, 0.5, 5.0, 61.0]), st.floats(0, 10)))
    def pause(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @precondition(lambda self: self._open())
    @rule()
    def half_close(self) -> None:
        assert self.conn is not None
        self.half_closed = True
        self.conn.half_close()

    @precondition(lambda self: self.conn is not None)
    @rule()
    def client_goes_away(self) -> None:
        assert self.conn is not None
        self.conn.close()
        self._finish()

    @precondition(lambda self: self.conn is not None)
    @rule()
    def server_aborts(self) -> None:
        assert self.conn is not None
        self.conn.sniffer.abort()
        self._finish()

    @precondition(lambda self: self.conn is not None)
    @rule(fallbacks=st.booleans())
    def reload(self, fallbacks: bool) -> None:
        assert self.factory is not None
        rules, fallback = self._fresh_rules(fallbacks)
        self.factory.set_rules(rules, **fallback)

    def _finish(self) -> None:
        """The connection is over: check its end once more, then allow the next one."""
        self.check_connection()
        assert self.conn is not None and not self.conn.transport.connected
        self.conn = None

    # Invariants

    def _ended_events(self) -> int:
        return len(self.metrics.ends)

    def _logged_ends(self) -> int:
        return sum(1 for e in self.events if e.get("log_event") == "connection_end")

    @invariant()
    def check_connection(self) -> None:
        conn, factory = self.conn, self.factory
        if conn is None or factory is None:
            return
        sniffer = conn.sniffer
        limit = factory.max_sniff_bytes
        # At most max_sniff_bytes held.
        held = sniffer._buffer
        assert held is None or len(held) <= limit, (len(held), limit)
        # Matcher work within the documented bound.
        for m in self.matchers:
            assert m.scanned <= max_matcher_work(limit), (m.name, m.scanned, limit)
        winners = [p for f in self.factories for p in f.built if p.transport is conn.transport]
        assert len(winners) <= 1, winners
        if winners:
            # Every byte after the PROXY header reached the winner once, in order.
            assert sniffer.outcome in (Outcome.HANDED_OFF, Outcome.TIMEOUT, Outcome.NO_MATCH), sniffer.outcome
            assert bytes(winners[0].received) == self.payload, (len(winners[0].received), len(self.payload))
            if self.half_closed:
                assert "read-closed" in winners[0].events
        ended = self._ended_events() - self.ended_before
        if conn.transport.connected:
            assert ended == 0
        else:
            # Ended: exactly one connection_end, with its reason.
            assert ended == 1, ended
            end = self.metrics.ends[-1]
            if not winners:
                # No winner: the end says why (refused, closed or aborted while sniffing, no fallback).
                assert end.outcome in {o.value for o in Outcome} - {Outcome.HANDED_OFF.value}, end
            if end.outcome != Outcome.REJECTED.value:
                # Logged too (refused connections' lines are throttled, at most one a second).
                assert self._logged_ends() - self.logged_before == 1
        # No timer outlives sniffing (the factory's refusal log may hold one, for a burst's tail, a second at most).
        calls = [c for c in self.clock.getDelayedCalls() if not isinstance(getattr(c.func, "__self__", None), BurstLog)]
        if sniffer.sniffing:
            assert len(calls) <= 2, calls
        else:
            assert calls == [], calls

    @invariant()
    def check_factories(self) -> None:
        """Inner factories start once; one out of the rules stops once nothing can use it."""
        factory, conn = self.factory, self.conn
        if factory is None:
            return
        wanted = {id(f) for f in factory._ruleset.factories}
        live = conn is not None and conn.transport.connected
        could_use = set()
        if live and conn is not None:
            if conn.sniffer.sniffing:
                could_use = {id(f) for f in conn.sniffer._ruleset.factories}
            elif conn.sniffer._handed_to is not None:
                could_use = {id(conn.sniffer._handed_to)}
        for f in self.factories:
            assert f.starts <= 1 and f.stops <= f.starts, (f.starts, f.stops)
            if id(f) in wanted or id(f) in could_use:
                assert (f.starts, f.stops) == (1, 0), (f.starts, f.stops)
            elif f.starts:
                assert f.stops == 1, "a factory no connection can use is still running"


class SniffingModelTests(unittest.TestCase):
    def test_sniffer_model(self) -> None:
        """Under any chunking, timing, half-close, abort, PROXY pre-stage and reload, the sniffing contract holds."""
        run_state_machine_as_test(
            SnifferMachine,
            settings=settings(
                max_examples=150,
                stateful_step_count=25,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            ),
        )
