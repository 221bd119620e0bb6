"""
The sniffer does not ask the rules about zero bytes on connect when the
first rule's matcher is marked as one that can only say ``NEED_MORE`` to
them (:func:`muxtwist._rules.needs_bytes`).
"""

from __future__ import annotations

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import protocol, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

import muxtwist.matchers as matchers
from muxtwist import Outcome, Rule, SniffingFactory, Verdict
from muxtwist._rules import needs_bytes, waits_for_bytes
from muxtwist.interfaces import ConnectionInfo, IMatcher, IRespondingMatcher
from muxtwist.matchers import HTTP1, SSH, RemoteAddress

#: every marked matcher class and a few of its configurations.
MARKED = [
    matchers.HTTP1(),
    matchers.HTTP1(methods=["GET"]),
    matchers.HTTP2(),
    matchers.TLS(),
    matchers.TLS(sni="example.test"),
    matchers.SSH(),
    matchers.Redis(),
    matchers.PostgreSQL(),
    matchers.MQTT(),
    matchers.Any(),
    matchers.WebSocket(),
    matchers.XMPP(),
    matchers.RDP(),
    matchers.SOCKS4(),
    matchers.SOCKS5(),
    matchers.OpenVPN(),
    matchers.ProxyProtocol(),
]

_PEERS = [
    IPv4Address("TCP", "127.0.0.1", 40000),
    IPv4Address("TCP", "10.1.2.3", 1),
    IPv6Address("TCP", "::1", 40000),
    UNIXAddress(None),
]


class _Counted(protocol.Protocol):
    pass


def _sniffer(rules: list[Rule]) -> tuple[SniffingFactory, object, StringTransport]:
    clock = task.Clock()
    factory = SniffingFactory(rules, reactor=clock)
    p = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert p is not None
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    p.makeConnection(transport)
    return factory, p, transport


class MarkTests(unittest.SynchronousTestCase):
    def test_every_marked_matcher_wants_more_of_zero_bytes_whatever_the_connection(self) -> None:
        """A marked matcher says NEED_MORE to zero bytes for any peer and local address, and writes nothing."""
        marked = {type(m) for m in MARKED}
        every = {
            value
            for name in matchers.__all__
            if isinstance(value := getattr(matchers, name), type) and getattr(value, "_needs_bytes", None) is not None
        }
        self.assertEqual(every, marked, "MARKED must list every marked class")
        for matcher in MARKED:
            self.assertFalse(IRespondingMatcher.providedBy(matcher), matcher)
            for peer in _PEERS:
                for local in _PEERS:
                    info = ConnectionInfo(peer=peer, local=local)
                    self.assertIs(matcher.match(b"", info), Verdict.NEED_MORE, (matcher, peer, local))

    def test_a_subclass_with_its_own_match_is_not_vouched_for(self) -> None:
        """The mark names the match it vouches for: a subclass that overrides match is asked on connect."""

        @attrs.frozen
        class Eager(HTTP1):
            def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
                return Verdict.MATCH

        self.assertTrue(waits_for_bytes([Rule(HTTP1(), _factory())]))
        self.assertFalse(waits_for_bytes([Rule(Eager(), _factory())]))

    def test_only_the_first_rule_counts(self) -> None:
        """The first NEED_MORE ends the asking: an unmarked second rule does not matter, an unmarked first one does."""
        self.assertTrue(waits_for_bytes([Rule(SSH(), _factory()), Rule(RemoteAddress("10.0.0.0/8"), _factory())]))
        self.assertFalse(waits_for_bytes([Rule(RemoteAddress("10.0.0.0/8"), _factory()), Rule(SSH(), _factory())]))
        self.assertTrue(waits_for_bytes([]))

    def test_needs_bytes_marks_the_class_it_is_given(self) -> None:
        """The decorator returns the class with its own match as the mark."""

        @needs_bytes
        @implementer(IMatcher)
        class Quiet:
            name = "quiet"

            def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
                return Verdict.NEED_MORE

        self.assertIs(Quiet._needs_bytes, Quiet.match)  # type: ignore[attr-defined]


def _factory() -> protocol.Factory:
    return protocol.Factory.forProtocol(_Counted)


@implementer(IMatcher)
class _Spy:
    """An unmarked matcher that counts what it is shown."""

    name = "spy"

    def __init__(self) -> None:
        self.shown: list[bytes] = []

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        self.shown.append(data)
        return Verdict.MATCH if data == b"!" else Verdict.NEED_MORE


class ConnectTests(unittest.SynchronousTestCase):
    def test_marked_first_rule_is_not_asked_on_connect(self) -> None:
        """Behind a marked first rule, connecting runs no evaluation; the first bytes run the first."""
        spy = _Spy()
        _, p, _ = _sniffer([Rule(SSH(), _factory()), Rule(spy, _factory())])
        self.assertEqual(p._evaluations, 0)  # type: ignore[attr-defined]
        p.dataReceived(b"!")  # type: ignore[attr-defined]
        self.assertEqual(spy.shown, [b"!"])
        self.assertEqual(p.outcome, Outcome.HANDED_OFF)  # type: ignore[attr-defined]

    def test_unmarked_first_rule_is_asked_on_connect(self) -> None:
        """An unmarked matcher may decide on the connection alone, so it is shown the zero bytes on connect."""
        spy = _Spy()
        _, p, _ = _sniffer([Rule(spy, _factory())])
        self.assertEqual(spy.shown, [b""])
        self.assertEqual(p._evaluations, 1)  # type: ignore[attr-defined]

    def test_a_responding_subclass_of_a_marked_matcher_still_writes_on_connect(self) -> None:
        """A subclass adding a respond() that answers zero bytes (a banner) is asked on connect and writes it."""

        @implementer(IRespondingMatcher)
        @attrs.frozen
        class Greeting(SSH):
            def respond(self, data: bytes, info: ConnectionInfo) -> bytes:
                return b"" if data else b"SSH-2.0-hello\r\n"

            def filter_replay(self, data: bytes) -> bytes:
                return data

        self.assertFalse(waits_for_bytes([Rule(Greeting(), _factory())]))
        _, p, transport = _sniffer([Rule(Greeting(), _factory())])
        self.assertEqual(transport.value(), b"SSH-2.0-hello\r\n")

    def test_remote_address_still_decides_on_connect(self) -> None:
        """A RemoteAddress first rule hands the connection off before any byte, as before."""
        _, p, _ = _sniffer([Rule(RemoteAddress("127.0.0.0/8"), _factory()), Rule(HTTP1(), _factory())])
        self.assertEqual(p.outcome, Outcome.HANDED_OFF)  # type: ignore[attr-defined]
        self.assertEqual(p.rule_name, "remote_address")  # type: ignore[attr-defined]

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=6))
    def test_outcome_is_the_same_with_and_without_the_connect_evaluation(self, chunks: list[bytes]) -> None:
        """For any chunks, a marked first rule decides as the same rules asked on connect (an unmarked twin) do."""

        @attrs.frozen
        class Unmarked(SSH):
            def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
                return SSH.match(self, data, info)

        results = []
        for first in (SSH(), Unmarked()):
            _, p, _ = _sniffer([Rule(first, _factory(), name="ssh"), Rule(HTTP1(), _factory())])
            for chunk in chunks:
                if not p.sniffing:  # type: ignore[attr-defined]
                    break
                p.dataReceived(chunk)  # type: ignore[attr-defined]
            results.append((p.outcome, p.rule_name))  # type: ignore[attr-defined]
        self.assertEqual(results[0], results[1])
