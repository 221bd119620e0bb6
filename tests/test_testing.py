"""
Tests for muxtwist.testing, the helpers users test their own rules with.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from muxtwist import Rule, SniffingFactory, Verdict
from muxtwist.matchers import HTTP1, Prefix
from muxtwist.testing import MemoryConnection, route

WEB = Factory.forProtocol(Protocol)
RULES = [Rule(HTTP1(host="a.test"), WEB, name="a"), Rule(HTTP1(), WEB, name="web"), Rule(Prefix(b"ECHO"), WEB)]


class RouteTests(unittest.TestCase):
    def test_winner(self) -> None:
        """route() names the rule that wins, with the verdicts that led there."""
        r = route(RULES, b"GET / HTTP/1.1\r\nHost: b.test\r\n\r\n")
        self.assertEqual(r.name, "web")
        self.assertEqual(r.verdicts, (("a", Verdict.NO_MATCH), ("web", Verdict.MATCH)))

    def test_undecided_and_no_match(self) -> None:
        """route() says which rule is still waiting, or that nothing matches."""
        waiting = route(RULES, b"GET / HTTP/1.1\r\n")
        self.assertIsNone(waiting.rule)
        self.assertIn("'a' needs more bytes", waiting.reason)
        self.assertIn("on_no_match", route(RULES, b"\x00\x01").reason)
        self.assertIn("on_timeout", route(RULES, b"", final=True).reason)
        self.assertEqual(route(RULES, b"GET / HTTP/1.1\r\n", final=True).name, "web")


class MemoryConnectionTests(unittest.TestCase):
    def test_pump_and_timeout(self) -> None:
        """MemoryConnection pumps bytes through a real SniffingFactory and drives its clock."""
        clock = task.Clock()
        factory = SniffingFactory(RULES, reactor=clock, on_timeout=WEB)
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"ECHO hello", chunk_size=1)
        self.assertEqual(conn.rule_name, "prefix")
        silent = MemoryConnection(factory, clock=clock)
        silent.advance(5)
        self.assertEqual(silent.rule_name, "on_timeout")
