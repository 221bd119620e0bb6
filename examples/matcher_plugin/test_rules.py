"""
Trial tests for the rules in ``rules.py``, in memory, with no sockets.

Run them with the plugin directory on the path::

    cd examples/matcher_plugin && PYTHONPATH=. python -m twisted.trial test_rules
"""

from __future__ import annotations

from acme_matchers import Memcached
from rules import rules
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from muxtwist import ConnectionInfo, Outcome, SniffingFactory, Verdict
from muxtwist.matchers import plugin
from muxtwist.testing import MemoryConnection, route


class MemcachedMatcherTests(TestCase):
    """The matcher on its own: bytes in, verdict out."""

    def test_verdicts(self) -> None:
        """A known command matches, a prefix of one needs more, anything else does not match."""
        m, info = Memcached(), ConnectionInfo()
        self.assertIs(m.match(b"get foo\r\n", info), Verdict.MATCH)
        self.assertIs(m.match(b"vers", info), Verdict.NEED_MORE)
        self.assertIs(m.match(b"GET / HTTP/1.1\r\n", info), Verdict.NO_MATCH)
        self.assertIs(m.match(b"flush_allx", info), Verdict.NO_MATCH)

    def test_found_by_name(self) -> None:
        """The plugin module makes the matcher available by name."""
        self.assertEqual(plugin("memcached"), Memcached())


class RouteTests(TestCase):
    """Which rule each kind of client reaches."""

    def test_memcached_client(self) -> None:
        """A memcached command goes to the cache."""
        self.assertEqual(route(rules, b"version\r\n").name, "cache")

    def test_http_client(self) -> None:
        """An HTTP request goes to the web site, even though 'GET' looks like 'get'."""
        self.assertEqual(route(rules, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").name, "web")

    def test_undecided(self) -> None:
        """Three bytes of a command are not enough to decide."""
        result = route(rules, b"ver")
        self.assertIsNone(result.rule)
        self.assertIn("needs more", result.reason)

    def test_unknown_protocol(self) -> None:
        """Bytes no rule knows go to on_no_match."""
        self.assertIsNone(route(rules, b"HELLO\r\n").rule)


class ConnectionTests(TestCase):
    """A whole connection pumped through a real SniffingFactory in memory."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.factory = SniffingFactory(rules, sniff_timeout=2.0, reactor=self.clock)
        self.factory.doStart()
        self.addCleanup(self.factory.doStop)

    def test_one_byte_at_a_time(self) -> None:
        """A client dribbling its command byte by byte still reaches the cache, which answers."""
        conn = MemoryConnection(self.factory, clock=self.clock)
        conn.send(b"version\r\n", chunk_size=1)
        self.assertEqual(conn.rule_name, "cache")
        self.assertEqual(conn.transport.value(), b"VERSION 1.6.0-acme\r\n")

    def test_silent_client(self) -> None:
        """A client that sends nothing is handed to on_timeout (here: closed) after sniff_timeout."""
        conn = MemoryConnection(self.factory, clock=self.clock)
        conn.advance(1.9)
        self.assertIsNone(conn.rule_name)
        conn.advance(0.2)
        self.assertIs(conn.outcome, Outcome.TIMEOUT)
        self.assertFalse(conn.transport.connected)
