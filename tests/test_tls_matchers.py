"""
Tests for muxtwist.matchers.info: the SNI and ALPN matchers and their plugins.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from muxtwist.interfaces import ConnectionInfo, Verdict
from muxtwist.matchers import ALPN, SNI, plugin
from muxtwist.sniffing import Rule
from muxtwist.testing import route

MATCH, NO_MATCH = Verdict.MATCH, Verdict.NO_MATCH


class SNITests(TestCase):
    """SNI(pattern, ...) looks only at ConnectionInfo.sni."""

    def test_exact_name_case_insensitive(self) -> None:
        """A name matches whatever its case, and a trailing dot is ignored."""
        m = SNI("A.test")
        self.assertIs(m.match(b"", ConnectionInfo(sni="a.TEST")), MATCH)
        self.assertIs(m.match(b"", ConnectionInfo(sni="a.test.")), MATCH)
        self.assertIs(m.match(b"", ConnectionInfo(sni="b.test")), NO_MATCH)
        self.assertIs(m.match(b"", ConnectionInfo(sni="xa.test")), NO_MATCH)

    def test_glob(self) -> None:
        """*.example.com covers names under it, not example.com itself."""
        m = SNI("*.example.com", "api.other.test")
        self.assertIs(m.match(b"", ConnectionInfo(sni="www.example.com")), MATCH)
        self.assertIs(m.match(b"", ConnectionInfo(sni="a.b.example.com")), MATCH)
        self.assertIs(m.match(b"", ConnectionInfo(sni="example.com")), NO_MATCH)
        self.assertIs(m.match(b"", ConnectionInfo(sni="api.other.test")), MATCH)

    def test_no_sni(self) -> None:
        """Without an SNI (outside TLS termination, or a client that sent none) it never matches."""
        self.assertIs(SNI("*").match(b"", ConnectionInfo()), NO_MATCH)

    def test_decides_without_bytes(self) -> None:
        """The verdict is the same with no bytes and with any bytes."""
        info = ConnectionInfo(sni="a.test")
        for data in (b"", b"GET / HTTP/1.1\r\n", b"\x00" * 100):
            self.assertIs(SNI("a.test").match(data, info), MATCH)

    def test_needs_a_pattern(self) -> None:
        """SNI() with no pattern, or a non-string one, is refused."""
        self.assertRaises(ValueError, SNI)
        self.assertRaises(TypeError, SNI, b"a.test")

    def test_routes_rules(self) -> None:
        """In a rule list, the SNI picks the rule before any byte arrives."""
        from muxtwist.actions import Reject

        rules = [Rule(SNI("a.test"), Reject(), name="a"), Rule(SNI("*.test"), Reject(), name="rest")]
        self.assertEqual(route(rules, b"", ConnectionInfo(sni="a.test")).name, "a")
        self.assertEqual(route(rules, b"", ConnectionInfo(sni="b.test")).name, "rest")


class ALPNTests(TestCase):
    """ALPN(*protocols) looks only at ConnectionInfo.alpn."""

    def test_match(self) -> None:
        """One of the protocols negotiated is a match; another, or none, is not."""
        m = ALPN("h2", "x-custom")
        self.assertIs(m.match(b"", ConnectionInfo(alpn="h2")), MATCH)
        self.assertIs(m.match(b"", ConnectionInfo(alpn="x-custom")), MATCH)
        self.assertIs(m.match(b"", ConnectionInfo(alpn="http/1.1")), NO_MATCH)
        self.assertIs(m.match(b"", ConnectionInfo()), NO_MATCH)

    def test_needs_a_protocol(self) -> None:
        """ALPN() with no protocol is refused."""
        self.assertRaises(ValueError, ALPN)
        self.assertRaises(TypeError, ALPN, "")


class PluginTests(TestCase):
    """The matchers are registered as plugins named sni and alpn."""

    def test_plugins(self) -> None:
        """plugin('sni', ...) and plugin('alpn', ...) build the same matchers, from a list or one string."""
        self.assertEqual(plugin("sni", patterns=["a.test", "*.b.test"]), SNI("a.test", "*.b.test"))
        self.assertEqual(plugin("sni", patterns="a.test"), SNI("a.test"))
        self.assertEqual(plugin("alpn", protocols=["h2"]), ALPN("h2"))
