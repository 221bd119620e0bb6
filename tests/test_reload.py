"""
Edges of a reload that changes listeners, on real loopback sockets: a stop
that begins while a reload closes ports, and endpoints whose addresses
cannot be compared (a plugin's, ``systemd:``).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, endpoints, reactor
from twisted.trial import unittest

from muxtwist import MuxService
from tests.test_service import Client
from tests.twistd import free_port

RULES = """\
from twisted.internet.protocol import Factory, Protocol
from muxtwist import Rule
from muxtwist.matchers import Prefix


class Hold(Protocol):
    def dataReceived(self, data):
        self.transport.write(b"%s:" % WORD + data)
        if data.endswith(b"BYE"):
            self.transport.loseConnection()


listeners = {{{entries}}}
sniff_timeout = 2
shutdown_timeout = 10
WORD = b"{word}"
"""
ENTRY = '"{description}": [Rule(Prefix(b"HI"), Factory.forProtocol(Hold), name="hi")]'


class Held(Client):
    """A client whose connection was handed off: ``answered`` fires with the first answer."""

    def __init__(self) -> None:
        super().__init__()
        self.answered: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if not self.answered.called:
            self.answered.callback(self.received)


async def held(port: int) -> Held:
    """A connection to 127.0.0.1:port that says HI, so that the rule's Hold protocol holds it."""
    client = Held()
    await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    client.transport.write(b"HI")  # type: ignore[union-attr]
    return client


class ReloadEdgeTests(unittest.TestCase):
    def write(self, descriptions: tuple[str, ...], word: str) -> None:
        entries = ", ".join(ENTRY.format(description=d) for d in descriptions)
        with open(self.path, "w") as f:
            f.write(RULES.format(entries=entries, word=word))

    def start(self, *descriptions: str) -> MuxService:
        from muxtwist.config import load_config

        self.path = os.path.abspath(self.mktemp() + "-rules.py")
        self.write(descriptions, "one")
        service = MuxService(config_path=self.path)
        service.load(load_config(self.path))
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    @defer.inlineCallbacks
    def test_a_stop_during_a_same_port_reload_waits_for_the_closed_listeners_connections(self) -> Any:
        """A stop begun while a reload closes a port for a new description ends once that port's connections end."""
        port = free_port()
        service = self.start(f"tcp:{port}:interface=127.0.0.1")
        client = yield defer.Deferred.fromCoroutine(held(port))
        self.assertEqual((yield client.answered), b"one:HI")
        self.write((f"tcp:{port}",), "two")
        reloaded = service.reload()
        stopped = service.stopService()
        ended = fired(stopped)
        self.assertFalse((yield reloaded))
        self.assertEqual(ended, [])
        self.assertFalse(client.lost.called)
        client.transport.write(b"BYE")  # type: ignore[union-attr]
        self.assertEqual((yield client.lost), b"one:HIone:BYE")
        yield stopped
        self.assertEqual(ended, [None])
        self.assertEqual(service.connections, [])


def fired(d: defer.Deferred[Any]) -> list[object]:
    """What ``d`` fired with, once it has (its result is left alone): empty until then."""
    results: list[object] = []

    def keep(result: object) -> object:
        results.append(result)
        return result

    d.addBoth(keep)
    return results

    @defer.inlineCallbacks
    def test_a_stop_waits_for_the_connections_of_a_listener_a_reload_removed(self) -> Any:
        """A stop while a listener a reload removed still drains ends once that listener's connections end."""
        old, new = free_port(), free_port()
        service = self.start(f"tcp:{old}:interface=127.0.0.1")
        client = yield defer.Deferred.fromCoroutine(held(old))
        self.assertEqual((yield client.answered), b"one:HI")
        self.write((f"tcp:{new}:interface=127.0.0.1",), "two")
        self.assertTrue((yield service.reload()))
        stopped = service.stopService()
        ended = fired(stopped)
        self.assertEqual(ended, [])
        client.transport.write(b"BYE")  # type: ignore[union-attr]
        self.assertEqual((yield client.lost), b"one:HIone:BYE")
        yield stopped
        self.assertEqual(ended, [None])
