"""
Tests that the values shown in the errors of rules, matchers, UDP and TLS
actions and application targets are cut (muxtwist._options.shown): an
integer of thousands of digits or a value whose ``__repr__`` raises gives the
class's own TypeError or ValueError, not a ValueError from int-to-str or the
``__repr__``'s exception.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest
from zope.interface import implementer

from muxtwist import Rule
from muxtwist._rules import check_unique_names
from muxtwist.actions import TerminateTLS
from muxtwist.apps import ASGI, WSGI, AsyncioProtocol
from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers import HTTP1, TLS, AnyOf, Regex
from muxtwist.udp import UDPProxy

#: An integer whose decimal text is beyond Python's 4,300-digit limit.
HUGE = 10**5000
HUGE_SHOWN = "10000000000000000000... (an integer of 5001 digits)"
BACKEND = "udp:host=127.0.0.1:port=5300"


class Unprintable:
    """A value whose ``__repr__`` raises."""

    def __repr__(self) -> str:
        raise RuntimeError("this repr raises")


@implementer(IMatcher)
class UnprintableMatcher:
    """A working matcher whose ``__repr__`` raises."""

    name = "unprintable"

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        return Verdict.MATCH

    def __repr__(self) -> str:
        raise RuntimeError("this repr raises")


def _factory() -> Factory:
    return Factory.forProtocol(Protocol)


class ShownValueTests(unittest.TestCase):
    """Each construction error names its own problem and shows the value in at most 200 characters."""

    def refused(self, expected: type[Exception], build: Callable[[], object], shown: str, said: str) -> None:
        """``build()`` raises ``expected`` whose message holds ``said`` and ``shown``, and is short."""
        error = self.assertRaises(expected, build)
        message = str(error)
        self.assertIn(said, message)
        self.assertIn(shown, message)
        self.assertNotIn("Exceeds the limit", message)
        self.assertLess(len(message), 600, message[:700])

    def both(self, expected: type[Exception], build: Callable[[Any], object], said: str) -> None:
        """``build(value)`` is refused for a 5,001-digit integer and for a value whose repr raises."""
        self.refused(expected, lambda: build(HUGE), HUGE_SHOWN, said)
        self.refused(expected, lambda: build(Unprintable()), "<Unprintable instance at 0x", said)

    def test_rule(self) -> None:
        """Rule's matcher, factory, name and max_connections errors show the value shortened."""
        self.both(TypeError, lambda v: Rule(v, _factory()), "Rule matcher must be an IMatcher, got ")
        self.both(TypeError, lambda v: Rule(HTTP1(), v), "Rule factory must be an IProtocolFactory")
        self.both(TypeError, lambda v: Rule(HTTP1(), _factory(), name=v), "Rule name must be a non-empty string")
        self.refused(
            ValueError,
            lambda: Rule(HTTP1(), _factory(), max_connections=-HUGE),
            "-" + HUGE_SHOWN,
            "Rule max_connections must be a positive integer or None, got ",
        )
        self.refused(
            ValueError,
            lambda: Rule(HTTP1(), _factory(), max_connections=Unprintable()),
            "<Unprintable instance at 0x",
            "Rule max_connections must be a positive integer or None, got ",
        )

    def test_rule_names_clash(self) -> None:
        """Two rules of the same name are named in the error even when their matcher's repr raises."""
        matcher = UnprintableMatcher()
        rules = [Rule(matcher, _factory(), name="a" * 1000), Rule(matcher, _factory(), name="a" * 1000)]
        self.refused(
            ValueError,
            lambda: check_unique_names(rules),
            "(matcher <UnprintableMatcher instance at 0x",
            "are both named 'aaaa",
        )

    def test_matchers(self) -> None:
        """HTTP1, TLS, Regex and AnyOf option errors show the value shortened."""
        self.both(TypeError, lambda v: HTTP1(host=v), "HTTP1 host must be str or a list of str, got ")
        self.both(TypeError, lambda v: HTTP1(methods=[v]), "HTTP1 methods must be str or bytes method names, got ")
        self.refused(
            ValueError, lambda: TLS(min_version=HUGE), HUGE_SHOWN, "TLS min_version must be 0x0300 (SSLv3) to 0x0304"
        )
        self.refused(
            TypeError,
            lambda: TLS(min_version=Unprintable()),
            "<Unprintable instance at 0x",
            "TLS min_version must be a version name or number, got ",
        )
        self.refused(ValueError, lambda: Regex(b"x", min_length=-HUGE), "-" + HUGE_SHOWN, "Regex min_length must be 0")
        self.both(TypeError, lambda v: Regex(v), "Regex pattern must be bytes, str or a compiled bytes pattern")
        self.both(TypeError, lambda v: AnyOf(HTTP1(), v), "AnyOf() takes matchers, got ")

    def test_tls_matcher_version_in_hex(self) -> None:
        """A TLS min_version number out of range that is short enough is still shown in hex."""
        self.refused(ValueError, lambda: TLS(min_version=0x0305), "0x0305", "TLS min_version must be 0x0300")

    def test_udp_proxy(self) -> None:
        """UDPProxy's balance, max_flows and idle_timeout errors show the value shortened."""
        self.both(ValueError, lambda v: UDPProxy(BACKEND, balance=v), "unknown balance ")
        self.refused(
            ValueError,
            lambda: UDPProxy(BACKEND, max_flows=-HUGE),
            "-" + HUGE_SHOWN,
            "max_flows must be a positive integer or None, got ",
        )
        self.refused(
            ValueError,
            lambda: UDPProxy(BACKEND, max_flows=Unprintable()),
            "<Unprintable instance at 0x",
            "max_flows must be a positive integer or None, got ",
        )
        self.both(ValueError, lambda v: UDPProxy(BACKEND, idle_timeout=v), "idle_timeout must be a positive number")

    def test_terminate_tls(self) -> None:
        """TerminateTLS's min_version, handshake limits and certificates keys show the value shortened."""
        missing = os.path.join(self.mktemp(), "certs")
        self.both(ValueError, lambda v: TerminateTLS(missing, _factory(), min_version=v), "min_version must be one of")
        self.refused(
            ValueError,
            lambda: TerminateTLS(missing, _factory(), max_handshakes=-HUGE),
            "-" + HUGE_SHOWN,
            "max_handshakes must be a positive integer or None, got ",
        )
        self.refused(
            ValueError,
            lambda: TerminateTLS(missing, _factory(), max_handshakes_per_source=Unprintable()),
            "<Unprintable instance at 0x",
            "max_handshakes_per_source must be a positive integer or None, got ",
        )
        self.both(ValueError, lambda v: TerminateTLS({v: 3}, _factory()), "TerminateTLS option certificates[")

    def test_app_targets(self) -> None:
        """WSGI, ASGI and AsyncioProtocol show a value that is not an application shortened."""
        self.both(TypeError, lambda v: WSGI(v), "WSGI needs a WSGI application (a callable), got ")
        self.both(TypeError, lambda v: ASGI(v), "ASGI needs an ASGI application (a callable), got ")
        self.both(ValueError, lambda v: ASGI(lambda *a: None, lifespan=v), "lifespan must be 'auto', 'on' or 'off'")
        self.both(TypeError, lambda v: AsyncioProtocol(v), "AsyncioProtocol needs a callable")
