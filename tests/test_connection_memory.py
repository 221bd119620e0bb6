"""What each live connection holds in memory, beyond the objects it cannot do without."""

from __future__ import annotations

import sys

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from muxtwist import Rule, SniffingFactory
from muxtwist.matchers import Any as AnyMatcher
from muxtwist.proxy._splice import Splice
from muxtwist.testing import MemoryConnection


def _size(obj: object) -> int:
    """Bytes of ``obj`` and, for a function, of the closure it carries."""
    size = sys.getsizeof(obj)
    closure = getattr(obj, "__closure__", None)
    if closure:
        size += sys.getsizeof(closure) + sum(sys.getsizeof(cell) for cell in closure)
    return size


class ConnectionMemoryTests(unittest.SynchronousTestCase):
    def test_handed_off_watch_is_small(self) -> None:
        """The connectionLost watcher each handed-off winner carries for its life takes under 100 bytes."""
        clock = Clock()
        factory = SniffingFactory([Rule(AnyMatcher(), Factory.forProtocol(Protocol), name="any")], reactor=clock)
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"hello")
        winner = conn.protocol
        self.assertIsNot(winner, conn.sniffer)
        watch = winner.connectionLost
        self.assertLess(_size(watch), 100)
        # The watcher still ends the connection's record.
        conn.close()
        self.assertEqual(factory.stats["any"].outcomes, {"handed_off": 1})

    def test_splice_has_no_instance_dict(self) -> None:
        """A spliced relay's Splice keeps its fields in slots, with no per-instance dict."""
        self.assertFalse(hasattr(Splice.__new__(Splice), "__dict__"))
