"""
Inputs the atheris harnesses in ``fuzz/`` found crashing, kept as tests so
the parsers never regress on them.
"""

from __future__ import annotations

import base64
import os
import sys

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from muxtwist.redirect import RedirectToHTTPS, location

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz"))

from targets import TARGETS

#: fuzz_redirect.py (the 10-minute run and a 20-second one): absolute-form targets with bytes that are not ASCII.
REDIRECT_NON_ASCII = [
    base64.b64decode("dP//////////Lwp0LTovL///////If//////////////dC8="),
    base64.b64decode(
        "Yf///2EKYTovL/////////////9hCmE6L////////////////////////////6SkpKSkpKSkpKSkpKSkpKSkpKSkpKSkpKSkpKSk"
        "pKSkpKSkpKSkpKSkpKSkpKSkpKSkpKSkpKSkpKSkpKSkpKSkpKT/////////////////////////////////////////////////"
        "/////////////////////////////////////////w=="
    ),
]


class RedirectRegressionTests(unittest.TestCase):
    """RedirectToHTTPS's Location builder on what the fuzzer found."""

    def test_fuzz_inputs_hold(self) -> None:
        """The crashing inputs pass the redirect fuzz target."""
        for data in REDIRECT_NON_ASCII:
            TARGETS["redirect"](data)

    def test_absolute_uri_with_non_ascii_bytes(self) -> None:
        """An absolute-form target holding non-ASCII bytes gets a Location on the Host, not an exception."""
        self.assertEqual(location(b"a.test", None, b"t-://\xff\xff!\xfft/"), b"https://a.test/")
        self.assertEqual(location(b"a.test", None, b"http://\xff/p\xe9?q=\xff"), b"https://a.test/p\xe9?q=\xff")

    def test_site_never_answers_500(self) -> None:
        """Through the redirect site such a request gets a 4xx or the redirect, never a server error."""
        site = RedirectToHTTPS()
        proto = site.buildProtocol(None)
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"GET http://\xff\xff/x HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        proto.connectionLost(Failure(ConnectionDone()))
        status = transport.value().split(b" ", 2)[1]
        # Twisted's own request parser refuses non-ASCII targets with 400 before the site sees them.
        self.assertIn(status, (b"301", b"400"))
