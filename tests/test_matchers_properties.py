"""
Properties every protocol matcher has, checked with hypothesis: it never
raises, it recognises its own valid messages, and it is monotonic (once a
prefix is decided, every extension gets the same verdict).
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from muxtwist.interfaces import IMatcher, Verdict
from muxtwist.matchers import (
    GRPC,
    HTTP2,
    MQTT,
    RDP,
    SOCKS4,
    SOCKS5,
    SSH,
    TLS,
    XMPP,
    HTTP2Header,
    OpenVPN,
    PostgreSQL,
    Redis,
    WebSocket,
    parse_client_hello,
)
from tests.matcher_checks import INFO, monotonic_failure, mutated, seeds

MATCHERS: dict[str, IMatcher] = {
    "tls": TLS(),
    "http2": HTTP2(),
    "http2_header": HTTP2Header(":method", prefix="GET"),
    "grpc": GRPC(),
    "websocket": WebSocket(),
    "ssh": SSH(),
    "redis": Redis(),
    "postgresql": PostgreSQL(),
    "mqtt": MQTT(),
    "socks4": SOCKS4(),
    "socks5": SOCKS5(),
    "openvpn": OpenVPN(),
    "xmpp": XMPP(),
    "rdp": RDP(),
}
#: Matchers with options take other paths through their code; fuzz those too.
OPTIONED: dict[str, IMatcher] = {
    "tls": TLS(sni=["*.example.com", "a.test"], alpn="h2", min_version="TLSv1.3"),
    "http2_header": HTTP2Header(":path", value="/"),
    "websocket": WebSocket(path="/chat*"),
    "xmpp": XMPP(to="*.example.com"),
}
SEEDS = seeds()
ALL_SEEDS = [s for samples in SEEDS.values() for s in samples]

NEVER_RAISES = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
MONOTONIC = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))


def _fuzz(name: str) -> Callable[[unittest.TestCase], None]:
    matchers = [MATCHERS[name]] + ([OPTIONED[name]] if name in OPTIONED else [])

    @NEVER_RAISES
    @given(st.one_of(mutated(SEEDS[name]), mutated(ALL_SEEDS), st.binary(max_size=64)))
    def test(self: unittest.TestCase, data: bytes) -> None:
        for m in matchers:
            self.assertIsInstance(m.match(data, INFO), Verdict)
            if hasattr(m, "respond"):
                self.assertIsInstance(m.respond(data, INFO), bytes)
                self.assertIsInstance(m.filter_replay(data), bytes)

    test.__doc__ = f"{name}: any bytes, mutated valid messages included, get a verdict and never an exception."
    return test


def _monotonic(name: str) -> Callable[[unittest.TestCase], None]:
    matchers = [MATCHERS[name]] + ([OPTIONED[name]] if name in OPTIONED else [])

    @MONOTONIC
    @given(st.one_of(mutated(SEEDS[name]), mutated(ALL_SEEDS)))
    def test(self: unittest.TestCase, data: bytes) -> None:
        for m in matchers:
            self.assertIsNone(monotonic_failure(m, data))

    test.__doc__ = f"{name}: once a prefix is decided, every longer prefix gets the same verdict."
    return test


def _recognises(name: str) -> Callable[[unittest.TestCase], None]:
    def test(self: unittest.TestCase) -> None:
        for sample in SEEDS[name]:
            self.assertIs(MATCHERS[name].match(sample, INFO), Verdict.MATCH, sample)
            self.assertIsNone(monotonic_failure(MATCHERS[name], sample))

    test.__doc__ = f"{name}: the valid first messages match, deciding monotonically over their prefixes."
    return test


def _others_refuse(name: str) -> Callable[[unittest.TestCase], None]:
    def test(self: unittest.TestCase) -> None:
        for other, samples in SEEDS.items():
            if other == name or {name, other} <= {"http2", "http2_header", "grpc"}:
                continue
            for sample in samples:
                self.assertIs(MATCHERS[name].match(sample, INFO), Verdict.NO_MATCH, (other, sample))

    test.__doc__ = f"{name}: every other protocol's valid message is NO_MATCH."
    return test


class NeverRaisesTests(unittest.TestCase):
    """Hypothesis: every matcher gives a verdict on any input."""

    locals().update({f"test_{n}": _fuzz(n) for n in MATCHERS})

    @NEVER_RAISES
    @given(mutated(SEEDS["tls"]))
    def test_parse_client_hello(self, data: bytes) -> None:
        """parse_client_hello returns a hello exactly when it says MATCH, and never raises."""
        verdict, hello = parse_client_hello(data)
        self.assertEqual(hello is not None, verdict is Verdict.MATCH)


class MonotonicTests(unittest.TestCase):
    """Hypothesis: verdicts never change once decided."""

    locals().update({f"test_{n}": _monotonic(n) for n in MATCHERS})


class RecognitionTests(unittest.TestCase):
    """Each matcher matches its own valid messages and refuses the others'."""

    locals().update({f"test_{n}": _recognises(n) for n in MATCHERS})
    locals().update({f"test_{n}_refuses_others": _others_refuse(n) for n in MATCHERS})
