"""
muxtwist._descriptions: endpoint description strings split as Twisted splits
them, the one parser behind the proxy's backends, the direct TCP connect and
the UDP backends and listeners.
"""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.internet.endpoints import _parse
from twisted.trial import unittest

from muxtwist._connect import _host_port
from muxtwist._descriptions import split_description
from muxtwist.proxy._backends import _host_of
from muxtwist.udp.proxy import _fields

#: Descriptions made of the characters that mean something to the grammar, and a few that do not.
descriptions = st.text(alphabet=st.sampled_from(":=\\ab1."), max_size=30)


class SplitDescriptionTests(unittest.SynchronousTestCase):
    # No deadline: a process paused for 200 ms (a busy host, two test processes) is no failure.
    @settings(deadline=None)
    @given(descriptions)
    def test_splits_as_twisted_does(self, description: str) -> None:
        """For any description, the parameters are those Twisted's own endpoint parser finds."""
        # Twisted's tokenizer fails on a description that ends in a lone backslash.
        assume((len(description) - len(description.rstrip("\\"))) % 2 == 0)
        self.assertEqual(split_description(description), _parse(description))

    def test_escapes(self) -> None:
        """A backslash makes the next character literal; only the first '=' of a parameter names it."""
        self.assertEqual(split_description(r"tcp:host=\:\:1:port=80"), (["tcp"], {"host": "::1", "port": "80"}))
        self.assertEqual(split_description("udp:443:x=a=b"), (["udp", "443"], {"x": "a=b"}))
        self.assertEqual(split_description(r"tcp:host\=x=1"), (["tcp"], {"host=x": "1"}))

    def test_users_agree(self) -> None:
        """The backends' host, the direct connect's address and the UDP fields read the same escaped host."""
        self.assertEqual(_host_of(r"tcp6:port=1:host=2001\:db8\:\:1"), "2001:db8::1")
        self.assertEqual(_host_port(r"tcp6:port=1:host=2001\:db8\:\:1"), ("2001:db8::1", 1))
        self.assertEqual(_fields(r"udp6:host=2001\:db8\:\:1:port=1"), ("udp6", {"host": "2001:db8::1", "port": "1"}))
        self.assertIsNone(_host_of("tcp:host=:port=1"))
        with self.assertRaises(ValueError):
            _fields("udp:443")
