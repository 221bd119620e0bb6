"""
Tests for the general matchers and HTTP/1 (muxtwist.matchers._basic, muxtwist.matchers.http)
and for finding matchers as plugins.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial import unittest

from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers import HTTP1, AllOf, Any, AnyOf, Not, Prefix, Regex, RemoteAddress, plugin, plugins
from muxtwist.matchers.http import HTTP_METHODS

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE
INFO = ConnectionInfo(peer=IPv4Address("TCP", "192.0.2.7", 5555))

REQUEST = (
    b"GET /api/v1/items?x=1 HTTP/1.1\r\nHost: Shop.Example.com:8080\r\nUser-Agent: curl/8\r\n"
    b"X-Tenant: Blue\r\nAccept: */*\r\n\r\n"
)


class BasicMatcherTests(unittest.TestCase):
    def test_any_needs_one_byte(self) -> None:
        """Any() waits for the first byte and then matches."""
        self.assertEqual(Any().match(b"", INFO), NEED_MORE)
        self.assertEqual(Any().match(b"\x00", INFO), MATCH)

    def test_prefix(self) -> None:
        """Prefix matches a prefix, waits on a proper prefix of one, and refuses the rest."""
        m = Prefix(b"ECHO", "PING")
        self.assertEqual(
            [m.match(d, INFO) for d in (b"", b"EC", b"ECHO", b"ECHO x", b"PI", b"PX")],
            [NEED_MORE, NEED_MORE, MATCH, MATCH, NEED_MORE, NO_MATCH],
        )
        self.assertRaises(ValueError, Prefix)

    def test_regex_min_length(self) -> None:
        """Regex finds its pattern; a miss waits until min_length bytes, then refuses."""
        m = Regex(rb"^[A-Z]{4} ", min_length=5)
        self.assertEqual(m.match(b"ABCD ", INFO), MATCH)
        self.assertEqual(m.match(b"ab", INFO), NEED_MORE)
        self.assertEqual(m.match(b"abcde", INFO), NO_MATCH)

    def test_remote_address(self) -> None:
        """RemoteAddress compares the PROXY source, or else the peer; v4-mapped IPv6 counts as IPv4."""
        m = RemoteAddress("192.0.2.0/24", "2001:db8::/32")
        self.assertEqual(m.match(b"", INFO), MATCH)
        mapped = ConnectionInfo(peer=IPv6Address("TCP", "::ffff:192.0.2.9", 1))
        self.assertEqual(m.match(b"", mapped), MATCH)
        v6 = ConnectionInfo(peer=IPv6Address("TCP", "2001:db8::1", 1))
        self.assertEqual(m.match(b"", v6), MATCH)
        proxied = INFO.evolve(proxy_source=IPv4Address("TCP", "198.51.100.1", 1))
        self.assertEqual(m.match(b"", proxied), NO_MATCH)
        self.assertEqual(m.match(b"", ConnectionInfo(peer=UNIXAddress(b"/tmp/s"))), NO_MATCH)
        self.assertRaises(ValueError, RemoteAddress, "not-a-network")

    def test_combinators(self) -> None:
        """AnyOf, AllOf and Not combine verdicts, keeping NEED_MORE while undecided."""
        a, b = Prefix(b"AB"), Prefix(b"ABC")
        self.assertEqual(AnyOf(Prefix(b"X"), a).match(b"AB", INFO), MATCH)
        self.assertEqual(AnyOf(Prefix(b"X"), b).match(b"AB", INFO), NEED_MORE)
        self.assertEqual(AnyOf(Prefix(b"X"), b).match(b"AZ", INFO), NO_MATCH)
        self.assertEqual(AllOf(a, b).match(b"AB", INFO), NEED_MORE)
        self.assertEqual(AllOf(a, b).match(b"ABC", INFO), MATCH)
        self.assertEqual(AllOf(a, RemoteAddress("10.0.0.0/8")).match(b"AB", INFO), NO_MATCH)
        self.assertEqual(Not(a).match(b"ZZ", INFO), MATCH)
        self.assertEqual(Not(a).match(b"A", INFO), NEED_MORE)
        self.assertEqual(Not(a).name, "not-prefix")
        self.assertRaises(TypeError, AnyOf, "not a matcher")


class HTTP1Tests(unittest.TestCase):
    def test_every_registered_method(self) -> None:
        """Every registered method, PATCH included, is an HTTP/1 request; PRI (HTTP/2) is not."""
        for method in HTTP_METHODS:
            self.assertEqual(HTTP1().match(method + b" / HTTP/1.1\r\n", INFO), MATCH, method)
        self.assertIn(b"PATCH", HTTP_METHODS)
        self.assertEqual(HTTP1().match(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", INFO), NO_MATCH)

    def test_request_line_needs_version(self) -> None:
        """The verdict waits for a complete request line and refuses a wrong version or garbage."""
        m = HTTP1()
        self.assertEqual(m.match(b"GET / HTTP/1.1", INFO), NEED_MORE)
        self.assertEqual(m.match(b"GET / HTTP/1.1\n", INFO), MATCH)
        self.assertEqual(m.match(b"GET / HTTP/3.0\r\n", INFO), NO_MATCH)
        self.assertEqual(m.match(b"GET /\x00 HTTP/1.1\r\n", INFO), NO_MATCH)
        self.assertEqual(m.match(b"get / HTTP/1.1\r\n", INFO), NO_MATCH)
        self.assertEqual(m.match(b"\x16\x03\x01", INFO), NO_MATCH)
        self.assertEqual(m.match(b"GET " + b"a" * 9000, INFO), NO_MATCH)

    def test_methods_option(self) -> None:
        """methods= limits the methods, given as str or bytes, any case."""
        m = HTTP1(methods=["post", b"PUT"])
        self.assertEqual(m.match(b"POST / HTTP/1.1\r\n", INFO), MATCH)
        self.assertEqual(m.match(b"GET / HTTP/1.1\r\n", INFO), NO_MATCH)

    def test_host_glob_case_insensitive_port_ignored(self) -> None:
        """host= compares a glob with Host case-insensitively, ignoring the port."""
        self.assertEqual(HTTP1(host="*.example.com").match(REQUEST, INFO), MATCH)
        self.assertEqual(HTTP1(host="shop.example.com").match(REQUEST, INFO), MATCH)
        self.assertEqual(HTTP1(host=["a.test", "b.test"]).match(REQUEST, INFO), NO_MATCH)
        self.assertEqual(HTTP1(host="example.com").match(REQUEST, INFO), NO_MATCH)
        v6 = b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"
        self.assertEqual(HTTP1(host="::1").match(v6, INFO), MATCH)
        absolute = b"GET http://a.test:81/x HTTP/1.1\r\nHost: a.test:81\r\n\r\n"
        self.assertEqual(HTTP1(host="a.test", path="/x").match(absolute, INFO), MATCH)
        self.assertEqual(HTTP1(host="a.test").match(b"GET / HTTP/1.0\r\n\r\n", INFO), NO_MATCH)

    def test_path_and_headers(self) -> None:
        """path= globs the path without the query; headers= needs names (any case) and value globs."""
        self.assertEqual(HTTP1(path="/api/*").match(REQUEST, INFO), MATCH)
        self.assertEqual(HTTP1(path="/api/v1/items").match(REQUEST, INFO), MATCH)
        self.assertEqual(HTTP1(path="/other").match(REQUEST, INFO), NO_MATCH)
        self.assertEqual(HTTP1(headers={"x-tenant": "blue"}).match(REQUEST, INFO), MATCH)
        self.assertEqual(HTTP1(headers={"X-TENANT": None, "user-agent": "curl/*"}).match(REQUEST, INFO), MATCH)
        self.assertEqual(HTTP1(headers={"x-tenant": "red"}).match(REQUEST, INFO), NO_MATCH)
        self.assertEqual(HTTP1(headers={"x-missing": None}).match(REQUEST, INFO), NO_MATCH)

    def test_head_waits_for_blank_line_and_is_bounded(self) -> None:
        """With head options the verdict waits for the whole head, up to a bound."""
        m = HTTP1(host="shop.example.com")
        self.assertEqual(m.match(REQUEST[:-2], INFO), NEED_MORE)
        huge = b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 17000 + b"\r\n\r\n"
        self.assertEqual(m.match(huge, INFO), NO_MATCH)
        self.assertEqual(m.match(b"GET / HTTP/1.1\r\nbad header\r\n\r\n", INFO), NO_MATCH)

    @settings(max_examples=2000, deadline=None)
    @given(st.binary(max_size=300))
    def test_never_raises(self, data: bytes) -> None:
        """No input makes the HTTP/1 matchers raise."""
        for m in (HTTP1(), HTTP1(host="*.a", path="/x*", headers={"h": None})):
            self.assertIn(m.match(data, INFO), Verdict)
            self.assertIn(m.match(b"GET / HTTP/1.1\r\n" + data, INFO), Verdict)

    @settings(max_examples=300, deadline=None)
    @given(
        st.sampled_from([REQUEST, b"POST /x HTTP/1.0\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\n", b"GET /\x01 x"]),
        st.binary(max_size=40),
    )
    def test_monotonic(self, stream: bytes, tail: bytes) -> None:
        """Once a prefix is decided, every longer prefix gets the same verdict."""
        stream += tail
        for m in (HTTP1(), HTTP1(host="shop.example.com")):
            decided = None
            for i in range(len(stream) + 1):
                v = m.match(stream[:i], INFO)
                if decided is not None:
                    self.assertEqual(v, decided, (m, stream[:i]))
                elif v is not NEED_MORE:
                    decided = v


class PluginTests(unittest.TestCase):
    def test_builtin_plugins(self) -> None:
        """The built-in matchers are found as plugins and built by name with options."""
        names = set(plugins())
        self.assertTrue({"any", "prefix", "regex", "remote_address", "http1"} <= names, names)
        m = plugin("http1", host="a.test")
        self.assertTrue(IMatcher.providedBy(m))
        self.assertEqual(m.match(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", INFO), MATCH)
        self.assertEqual(plugin("prefix", prefixes=[b"X"]).match(b"X", INFO), MATCH)

    def test_unknown_plugin_names_the_installed_ones(self) -> None:
        """Asking for a plugin that is not installed says which are."""
        e = self.assertRaises(LookupError, plugin, "no-such-protocol")
        self.assertIn("http1", str(e))

    def test_third_party_plugin_on_sys_path(self) -> None:
        """A third-party module in its own twisted/plugins/ on sys.path is found by name."""
        root = self.mktemp()
        os.makedirs(os.path.join(root, "twisted", "plugins"))
        with open(os.path.join(root, "twisted", "plugins", "acme_matchers.py"), "w") as f:
            f.write(
                textwrap.dedent("""
                import attrs
                from zope.interface import implementer
                from muxtwist.interfaces import IMatcher, Verdict
                from muxtwist.matchers import MatcherPlugin

                @implementer(IMatcher)
                @attrs.frozen
                class Acme:
                    name = "acme"
                    magic: bytes = b"ACME"
                    def match(self, data, info):
                        return Verdict.MATCH if data.startswith(self.magic) else Verdict.NO_MATCH

                acme = MatcherPlugin("acme", Acme, "the ACME protocol")
            """)
            )
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        code = (
            "from muxtwist.matchers import plugin\n"
            "from muxtwist.interfaces import ConnectionInfo\n"
            "m = plugin('acme', magic=b'ACME1')\n"
            "print(m.name, m.match(b'ACME1 hello', ConnectionInfo()).name)\n"
        )
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, here]))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip(), "acme MATCH")
