"""
muxtwist._connect: the non-blocking connect to plain TCP backends given by
IP address, on real loopback sockets, and where Proxy uses it.
"""

from __future__ import annotations

import gc
import socket
import sys

from twisted.internet import defer, error, task, tcp
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from zope.interface import implementer

from muxtwist import Rule
from muxtwist._connect import DirectTCPEndpoint, direct_endpoint
from muxtwist.actions import Proxy
from muxtwist.matchers import Any as AnyMatcher
from tests.test_proxy_support import Echo, Peer, R, backend, connect, mux, open_fds, until, wait

LINUX = sys.platform.startswith("linux")


class DescriptionTests(unittest.SynchronousTestCase):
    """Which descriptions get the direct connect, and which keep Twisted's endpoint."""

    if not LINUX:
        skip = "the direct connect is Linux only"

    def test_ip_host_and_port(self) -> None:
        """tcp: and tcp6: descriptions naming an IP address and a port, by keyword or position, get it."""
        for description in ("tcp:host=127.0.0.1:port=80", "tcp:127.0.0.1:80", r"tcp6:host=\:\:1:port=80"):
            self.assertIsInstance(direct_endpoint(R, description), DirectTCPEndpoint, description)

    def test_everything_else_keeps_twisted(self) -> None:
        """Host names, other options, other kinds and bad ports keep Twisted's portable endpoint."""
        for description in (
            "tcp:host=localhost:port=80",
            "tcp:host=127.0.0.1:port=80:timeout=3",
            "tcp:host=127.0.0.1:port=80:bindAddress=127.0.0.2",
            "tcp:host=127.0.0.1:port=0",
            "tcp:host=127.0.0.1",
            "unix:path=/run/app.sock",
            r"tcp6:host=fe80\:\:1%eth0:port=80",
            "tcp6:host=127.0.0.1:port=80",
        ):
            self.assertIsNone(direct_endpoint(R, description), description)

    def test_not_a_posix_reactor(self) -> None:
        """A reactor that is not a real POSIX one (a test reactor) keeps Twisted's endpoint."""
        self.assertIsNone(direct_endpoint(MemoryReactorClock(), "tcp:host=127.0.0.1:port=80"))

    def test_proxy_uses_it_for_plain_tcp_only(self) -> None:
        """Proxy connects directly to plain TCP backends by IP address, and through Twisted to TLS or named ones."""
        plain = Proxy("tcp:host=127.0.0.1:port=6379")
        self.assertIsInstance(plain.backends[0].endpoint, DirectTCPEndpoint)
        named = Proxy("tcp:host=localhost:port=6379")
        self.assertNotIsInstance(named.backends[0].endpoint, DirectTCPEndpoint)
        secure = Proxy("tcp:host=127.0.0.1:port=6379", tls="backend.test")
        self.assertNotIsInstance(secure.backends[0].endpoint, DirectTCPEndpoint)


class ConnectTests(unittest.TestCase):
    """DirectTCPEndpoint on loopback."""

    if not LINUX:
        skip = "the direct connect is Linux only"

    async def test_connects_with_an_ordinary_tcp_transport(self) -> None:
        """The protocol gets connectionMade on a reactor TCP transport whose peer is the backend, and bytes flow."""
        description, factory = backend(self, Echo)
        endpoint = direct_endpoint(R, description)
        assert endpoint is not None
        client = Peer()
        built = await wait(endpoint.connect(_Once(client)), 5)
        self.assertIs(built, client)
        self.assertTrue(client.made.called)
        self.assertIsInstance(client.transport, tcp.Connection)
        assert client.transport is not None
        self.assertEqual(client.transport.getPeer().port, int(description.rsplit("=", 1)[1]))
        client.transport.write(b"ping")
        self.assertEqual(await client.received_at_least(4), b"ping")
        client.transport.loseConnection()
        await wait(client.lost, 5)

    async def test_a_factory_keeps_its_connect_only_while_it_waits(self) -> None:
        """A factory with ``connecting`` holds the pending connect while it waits, and lets go once it is over."""
        description, _ = backend(self, Echo)
        endpoint = direct_endpoint(R, description)
        assert endpoint is not None
        client = Peer()
        waiting = _Once(client)
        waiting.connecting = None  # type: ignore[attr-defined]
        d = endpoint.connect(waiting)
        self.assertIsNotNone(waiting.connecting)  # type: ignore[attr-defined]
        await wait(d, 5)
        self.assertIsNone(waiting.connecting)  # type: ignore[attr-defined]
        assert client.transport is not None
        client.transport.loseConnection()
        await wait(client.lost, 5)

    async def test_refused(self) -> None:
        """A closed port fails the Deferred with ConnectionRefusedError and leaves no descriptor open."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        await settled()
        before = open_fds()
        d = DirectTCPEndpoint(R, "127.0.0.1", port).connect(_Once(Peer()))
        with self.assertRaises(error.ConnectionRefusedError):
            await wait(d, 5)
        self.assertEqual(open_fds(), before)

    async def test_cancel_closes_the_socket(self) -> None:
        """Cancelling a connect that cannot finish fails it with CancelledError and closes its socket."""
        full = socket.socket()
        self.addCleanup(full.close)
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        # Fill the accept queue so that the next SYN is dropped and the connect hangs.
        fillers = []
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(full.getsockname())
            fillers.append(s)
        for s in fillers:
            self.addCleanup(s.close)
        await settled()
        before = open_fds()
        d = DirectTCPEndpoint(R, "127.0.0.1", full.getsockname()[1]).connect(_Once(Peer()))
        self.assertEqual(open_fds(), before + 1)
        d.cancel()
        with self.assertRaises(defer.CancelledError):
            await d
        self.assertEqual(open_fds(), before)

    async def test_relay_through_the_direct_connect(self) -> None:
        """A Proxy relays both ways to a backend reached by the direct connect, and leaks no descriptor."""
        description, factory = backend(self, Echo)
        proxy = Proxy(description)
        self.assertIsInstance(proxy.backends[0].endpoint, DirectTCPEndpoint)
        port, _ = mux(self, [Rule(AnyMatcher(), proxy, name="relay")])
        fds = 0
        for attempt in range(2):
            # The first round opens what the process keeps (the reactor's waker, pipes); the second counts.
            client = await connect(self, port)
            assert client.transport is not None
            client.transport.write(b"hello")
            self.assertEqual(await client.received_at_least(5), b"hello")
            client.transport.loseConnection()
            await wait(client.lost, 5)
            await until(lambda: not proxy.relays)
            if attempt == 0:
                fds = open_fds()
        await until(lambda: open_fds() <= fds, 5)
        self.assertEqual(proxy.stats[description].total, 2)


async def settled() -> None:
    """
    One reactor turn, so that descriptors the reactor opens once (its waker)
    are open before counting; and the garbage of earlier tests collected, so
    that a socket left in a reference cycle is not closed by the collector
    between two counts.
    """
    gc.collect()
    await task.deferLater(R, 0, lambda: None)


@implementer(IProtocolFactory)
class _Once:
    """A factory for one existing protocol (as the relay's)."""

    def __init__(self, protocol: Peer) -> None:
        self.protocol = protocol

    def buildProtocol(self, addr: object) -> Peer:
        return self.protocol

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass
