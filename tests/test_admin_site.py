"""
The admin site's bound on open connections, on a real listening port on
127.0.0.1: clients holding connections cannot use up the process's
descriptors, and the site answers again once they leave.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.trial import unittest

from muxtwist.admin import admin_site

#: Seconds any one step of these tests may take.
STEP = 5.0


class Holder(Protocol):
    """A client that keeps what it reads and tells when the server closes it."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        if not self.closed.called:
            self.closed.callback(None)


class AdminConnectionLimitTests(unittest.TestCase):
    def setUp(self) -> None:
        self.site = admin_site(max_connections=3)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.port.stopListening)
        self.clients: list[Holder] = []

    def tearDown(self) -> defer.Deferred[Any]:
        waits = []
        for client in self.clients:
            if client.transport is not None:
                client.transport.abortConnection()  # type: ignore[attr-defined]
            waits.append(client.closed)
        return defer.DeferredList(waits)

    async def connect(self) -> Holder:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port, timeout=STEP)
        client = Holder()
        self.clients.append(client)
        await connectProtocol(endpoint, client).addTimeout(STEP, reactor)
        return client

    async def wait_open(self, n: int) -> None:
        """Until the site holds ``n`` connections (bounded by STEP)."""
        for _ in range(int(STEP / 0.01)):
            if self.site.open_connections == n:  # type: ignore[attr-defined]
                return
            await deferLater(reactor, 0.01)  # type: ignore[arg-type]
        self.fail(f"the site holds {self.site.open_connections} connections, not {n}")  # type: ignore[attr-defined]

    @defer.inlineCallbacks
    def test_connections_past_the_limit_are_closed_and_the_site_answers_once_they_leave(self) -> Any:
        """Past max_connections a new connection is closed at once, the held ones stay, and one leaving makes room."""
        held = []
        for _ in range(3):
            held.append((yield defer.ensureDeferred(self.connect())))
        yield defer.ensureDeferred(self.wait_open(3))
        extra = yield defer.ensureDeferred(self.connect())
        yield extra.closed.addTimeout(STEP, reactor)
        self.assertEqual(extra.received, b"")
        self.assertFalse(any(c.closed.called for c in held))
        held[0].transport.loseConnection()  # type: ignore[union-attr]
        yield held[0].closed.addTimeout(STEP, reactor)
        yield defer.ensureDeferred(self.wait_open(2))
        asker = yield defer.ensureDeferred(self.connect())
        asker.transport.write(b"GET /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")  # type: ignore[union-attr]
        yield asker.closed.addTimeout(STEP, reactor)
        self.assertTrue(asker.received.startswith(b"HTTP/1.1 200 "), asker.received[:80])
        self.assertTrue(asker.received.endswith(b"ready\n"))

    def test_bad_limits_are_refused(self) -> None:
        """A max_connections that is not a positive integer is refused with a clear error."""
        for bad in (0, -1, 1.5, True, "10"):
            with self.assertRaises(ValueError):
                admin_site(max_connections=bad)  # type: ignore[arg-type]
