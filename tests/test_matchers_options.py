"""
Matcher options are checked when the matcher is built: a wrong one is a
TypeError or ValueError naming the matcher, the option, the value and what
is expected, never a matcher that fails at the first connection or never
matches.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from twisted.trial import unittest

from muxtwist.matchers import (
    ALPN,
    GRPC,
    HTTP1,
    HTTP2,
    MQTT,
    RDP,
    SNI,
    SOCKS4,
    SOCKS5,
    SSH,
    TLS,
    XMPP,
    AllOf,
    Any,
    AnyOf,
    HTTP2Header,
    Not,
    OpenVPN,
    PostgreSQL,
    Prefix,
    ProxyProtocol,
    Redis,
    Regex,
    RemoteAddress,
    WebSocket,
    plugin,
)

#: (what is built, the error type, fragments its message must hold).
BAD: list[tuple[str, Callable[[], object], type[Exception], tuple[str, ...]]] = [
    ("HTTP1 host bytes", lambda: HTTP1(host=b"a.test"), TypeError, ("HTTP1 host must be str", "b'a.test'", "bytes")),
    ("HTTP1 host int", lambda: HTTP1(host=3), TypeError, ("HTTP1 host must be str", "3 (int)")),
    ("HTTP1 host list of bytes", lambda: HTTP1(host=[b"a"]), TypeError, ("HTTP1 host must be str", "b'a'")),
    ("HTTP1 host with port", lambda: HTTP1(host="a.test:8080"), ValueError, ("HTTP1 host", "port", "'a.test:8080'")),
    ("HTTP1 host url", lambda: HTTP1(host="http://a.test/"), ValueError, ("HTTP1 host", "without scheme")),
    ("HTTP1 host empty", lambda: HTTP1(host=""), ValueError, ("HTTP1 host", "empty")),
    ("HTTP1 host empty list", lambda: HTTP1(host=[]), ValueError, ("HTTP1 host", "at least one")),
    ("HTTP1 path relative", lambda: HTTP1(path="x"), ValueError, ("path must start with /", "'x'")),
    ("HTTP1 path bytes", lambda: HTTP1(path=b"/x"), TypeError, ("HTTP1 path must be str", "bytes")),
    ("HTTP1 methods int", lambda: HTTP1(methods=[1]), TypeError, ("HTTP1 methods", "1 (int)")),
    ("HTTP1 methods space", lambda: HTTP1(methods=["GE T"]), ValueError, ("HTTP1 methods", "token", "'GE T'")),
    ("HTTP1 methods empty", lambda: HTTP1(methods=[]), ValueError, ("HTTP1 methods", "at least one")),
    ("HTTP1 headers name", lambda: HTTP1(headers={"x y": None}), ValueError, ("HTTP1 headers", "token", "'x y'")),
    ("HTTP1 headers value", lambda: HTTP1(headers={"x": 1}), TypeError, ("HTTP1 headers", "1 (int)")),
    ("HTTP1 headers str", lambda: HTTP1(headers="x-a"), TypeError, ("HTTP1 headers", "'x-a'")),
    ("HTTP1 name", lambda: HTTP1(name=""), ValueError, ("HTTP1 name", "non-empty")),
    ("HTTP1 name bytes", lambda: HTTP1(name=b"web"), TypeError, ("HTTP1 name", "b'web'")),
    ("WebSocket path", lambda: WebSocket(path="chat"), ValueError, ("WebSocket path must start with /",)),
    ("TLS sni bytes", lambda: TLS(sni=b"a.test"), TypeError, ("TLS sni must be str", "bytes")),
    ("TLS sni port", lambda: TLS(sni="a.test:443"), ValueError, ("TLS sni", "port")),
    ("TLS alpn bytes", lambda: TLS(alpn=[b"h2"]), TypeError, ("TLS alpn must be str", "b'h2'")),
    ("TLS min_version name", lambda: TLS(min_version="TLS1.3"), ValueError, ("TLS min_version", "'TLS1.3'")),
    ("TLS min_version number", lambda: TLS(min_version=13), ValueError, ("TLS min_version", "0x000d")),
    ("TLS min_version float", lambda: TLS(min_version=1.3), TypeError, ("TLS min_version", "1.3 (float)")),
    ("XMPP to bytes", lambda: XMPP(to=b"chat.test"), TypeError, ("XMPP to must be str", "bytes")),
    ("SOCKS4 allow_4a", lambda: SOCKS4(allow_4a="no"), TypeError, ("SOCKS4 allow_4a", "True or False", "'no'")),
    ("ProxyProtocol version", lambda: ProxyProtocol(version=3), ValueError, ("ProxyProtocol version", "1, 2", "3")),
    ("ProxyProtocol str", lambda: ProxyProtocol(version="1"), ValueError, ("ProxyProtocol version", "'1'")),
    ("HTTP2Header header", lambda: HTTP2Header(b":path"), TypeError, ("HTTP2Header header", "bytes")),
    ("HTTP2Header value", lambda: HTTP2Header(":path", value=b"/"), TypeError, ("HTTP2Header value", "b'/'")),
    ("HTTP2Header prefix", lambda: HTTP2Header(":path", prefix=1), TypeError, ("HTTP2Header prefix", "1 (int)")),
    ("Prefix int", lambda: Prefix(1), TypeError, ("Prefix prefixes must be bytes or str", "1 (int)")),
    ("Regex str pattern object", lambda: Regex(re.compile("a")), TypeError, ("Regex pattern", "str pattern")),
    ("Regex invalid", lambda: Regex("("), ValueError, ("Regex pattern", "valid regular expression", "'('")),
    ("Regex int", lambda: Regex(5), TypeError, ("Regex pattern", "5 (int)")),
    ("Regex min_length", lambda: Regex("a", min_length=-1), ValueError, ("Regex min_length", "-1")),
    ("Regex min_length str", lambda: Regex("a", min_length="3"), TypeError, ("Regex min_length", "'3'")),
    ("RemoteAddress bytes", lambda: RemoteAddress(b"10.0.0.0/8"), TypeError, ("RemoteAddress networks", "bytes")),
    ("RemoteAddress bad", lambda: RemoteAddress("10.0.0.300"), ValueError, ("RemoteAddress networks", "10.0.0.300")),
    ("AnyOf name", lambda: AnyOf(SSH(), name=3), TypeError, ("AnyOf name", "3 (int)")),
    ("Not name", lambda: Not(SSH(), name=b"x"), TypeError, ("Not name", "b'x'")),
    ("SNI name", lambda: SNI("a.test", name=""), ValueError, ("SNI name",)),
    ("ALPN name", lambda: ALPN("h2", name=1), TypeError, ("ALPN name", "1 (int)")),
    ("Redis name", lambda: Redis(name=None), TypeError, ("Redis name", "None")),
    ("SSH name", lambda: SSH(name=""), ValueError, ("SSH name",)),
    ("plugin http1 host", lambda: plugin("http1", host=b"a"), TypeError, ("HTTP1 host must be str",)),
]

#: Every matcher with its options given right, in each accepted form.
GOOD: list[Callable[[], object]] = [
    lambda: HTTP1(),
    lambda: HTTP1(host="a.test", path="/api/*", methods=["get", b"POST"], headers={"X-A": "b*", "x-b": None}),
    lambda: HTTP1(host=["a.test", "*.b.test", "::1", "admin.internal."], path=["*", "/"], methods="GET"),
    lambda: HTTP1(headers=[("x-a", None)]),
    lambda: WebSocket(path="/chat"),
    lambda: TLS(sni=("a.test", "*.b.test"), alpn="h2", min_version="TLSv1.2"),
    lambda: TLS(min_version=0x0304),
    lambda: XMPP(to="chat.test"),
    lambda: SOCKS4(allow_4a=False),
    lambda: SOCKS5(),
    lambda: ProxyProtocol(version=2),
    lambda: HTTP2Header(":authority", value="a.test", prefix="a"),
    lambda: HTTP2(),
    lambda: GRPC(name="api"),
    lambda: Prefix(b"x", "y", name="p"),
    lambda: Regex(rb"^x", min_length=3),
    lambda: Regex(re.compile(rb"x")),
    lambda: RemoteAddress("10.0.0.0/8", "::1"),
    lambda: AllOf(SSH(), Any(), name="both"),
    lambda: Not(SSH()),
    lambda: SNI("a.test"),
    lambda: ALPN("h2"),
    lambda: MQTT(),
    lambda: OpenVPN(),
    lambda: PostgreSQL(),
    lambda: RDP(),
    lambda: Redis(name="cache"),
]


class OptionTests(unittest.TestCase):
    """What building a matcher with wrong options says."""

    def test_wrong_options_name_option_value_and_expectation(self) -> None:
        """Each wrong option raises the right error, naming the matcher, the option, the value and what is wanted."""
        problems = []
        for label, build, error, fragments in BAD:
            try:
                build()
            except error as e:
                missing = [f for f in fragments if f not in str(e)]
                if missing:
                    problems.append(f"{label}: {str(e)!r} lacks {missing}")
            except Exception as e:
                problems.append(f"{label}: {type(e).__name__} {e}, not {error.__name__}")
            else:
                problems.append(f"{label}: accepted")
        self.assertEqual(problems, [])

    def test_right_options_are_accepted(self) -> None:
        """Every matcher builds with its options given in each documented form."""
        for build in GOOD:
            build()

    def test_single_method_string_is_one_method(self) -> None:
        """``methods="GET"`` means the GET method, not the methods G, E and T."""
        self.assertEqual(HTTP1(methods="get").methods, frozenset({b"GET"}))
