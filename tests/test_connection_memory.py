"""What each live connection holds in memory, beyond the objects it cannot do without."""

from __future__ import annotations

import sys

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest

from muxtwist import Rule, SniffingFactory
from muxtwist.matchers import Any as AnyMatcher
from muxtwist.matchers import Prefix
from muxtwist.proxy._splice import Splice
from muxtwist.testing import MemoryConnection

#: Bytes a client sends before its connection is handed off: the sniffer
#: buffers them, replays them, and must then let them go.
SNIFFED = 16000


def _slot_bytes(obj: object) -> int:
    """Bytes of the values ``obj`` holds in its slots, each counted shallow (its own size)."""
    names = {name for cls in type(obj).__mro__ for name in getattr(cls, "__slots__", ())}
    return sum(sys.getsizeof(getattr(obj, name, None)) for name in names)


class ConnectionMemoryTests(unittest.SynchronousTestCase):
    def test_handed_off_sniffer_lets_the_sniffed_bytes_go(self) -> None:
        """Once a connection is handed off, its sniffer holds under 4 KiB: the 16,000 bytes it sniffed are released."""
        clock = Clock()
        factory = SniffingFactory([Rule(AnyMatcher(), Factory.forProtocol(Protocol), name="any")], reactor=clock)
        conn = MemoryConnection(factory, clock=clock)
        sniffer = conn.sniffer
        conn.send(b"x" * SNIFFED)
        self.assertIsNot(conn.protocol, sniffer)
        self.assertFalse(hasattr(sniffer, "__dict__"))
        self.assertLess(_slot_bytes(sniffer), 4096)
        conn.close()
        self.assertEqual(factory.stats["any"].outcomes, {"handed_off": 1})
        # The measure sees bytes a sniffer holds: one still deciding holds them all.
        waiting = SniffingFactory([Rule(Prefix(b"y" * (SNIFFED + 1)), Factory.forProtocol(Protocol))], reactor=clock)
        undecided = MemoryConnection(waiting, clock=clock)
        undecided.send(b"y" * SNIFFED)
        self.assertGreater(_slot_bytes(undecided.sniffer), SNIFFED)

    def test_splice_has_no_instance_dict(self) -> None:
        """A spliced relay's Splice keeps its fields in slots, with no per-instance dict."""
        self.assertFalse(hasattr(Splice.__new__(Splice), "__dict__"))
