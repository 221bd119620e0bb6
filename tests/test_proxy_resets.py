"""
A peer that resets its connection while the relay is not reading it (after
its half-close, or paused because the other side takes nothing), on real
loopback sockets: the relay ends at once and closes the other side (the
spliced relay resets it), rather than waiting for the other side to end or
for its next write.

The spliced relay hears of such a reset on every path; the Twisted relay
only for a client read by the splice poller (a listener whose rules only
relay), where what a client is read by can report an error while it is not
read. A client or backend that is a reactor transport is not polled at all
while it is not read: a reset then goes unnoticed until the relay writes to
it or the other side ends (see docs/proxy.md, "Resets of a side no longer
read"). A hang-up that is no reset (the client's end of stream arriving
after the relay has shut the client's sending side) stays a clean end.
"""

from __future__ import annotations

import select
import socket
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.trial import unittest

from muxtwist import Rule
from muxtwist.actions import Proxy
from muxtwist.matchers import Any as AnyMatcher
from muxtwist.proxy import _splice
from muxtwist.proxy._polled import PolledServer
from muxtwist.proxy._relay import PENDING_LIMIT, Relay
from tests.test_proxy import _full_listener
from tests.test_proxy_support import Peer, R, backend, mux, until, wait

#: how long the relay may take to hear of a reset (it is at once; a busy host is slow).
PROMPT = 2.0


class Silent(Peer):
    """A backend that reads nothing, answers nothing and never closes."""

    def connectionMade(self) -> None:
        super().connectionMade()
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]


def raw_client(case: unittest.TestCase, port: int) -> socket.socket:
    """A plain non-blocking client socket connected to ``port``; closed in cleanup."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setblocking(False)
    case.addCleanup(sock.close)
    return sock


def send_all(sock: socket.socket, data: bytes) -> int:
    """Send what the kernel takes now; how much."""
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: an RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def was_reset(sock: socket.socket) -> bool:
    """Whether ``sock`` has been reset (asked of the kernel: its reader may read nothing)."""
    poller = select.poll()
    poller.register(sock, select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


def closed_by_proxy(sock: socket.socket) -> bool:
    """
    Whether the proxy's end of ``sock``'s connection is closed (after its
    half-close): reset, or resetting the byte this sends.
    """
    if was_reset(sock):
        return True
    try:
        sock.send(b"?")
    except OSError:
        return True
    return False


def client_read_closed(relay: Relay) -> bool:
    """Whether the relay has read its client's end of stream."""
    splice = relay._splice
    return splice.up.ended if splice is not None else relay._client_read_closed


def client_paused(relay: Relay) -> bool:
    """Whether the relay has stopped reading its client because the backend takes nothing more."""
    splice = relay._splice
    if splice is not None:
        return not splice.client.reading and splice.up.blocked
    transport = relay.transport
    if isinstance(transport, PolledServer):
        return not transport._readiness.reading
    return transport not in R.getReaders()


def stays_paused(relay: Relay, client: socket.socket) -> Callable[[], bool]:
    """
    A condition: the client sends all it can, until its relay has stopped
    reading it and the client could send nothing more for a while (early
    pauses end as the kernel buffers on the way to the backend grow).
    """
    chunk = b"x" * 65536
    quiet = [0]

    def paused() -> bool:
        sent = send_all(client, chunk)
        quiet[0] = quiet[0] + 1 if not sent and client_paused(relay) else 0
        return quiet[0] >= 20

    return paused


class UnreadResetTests(unittest.TestCase):
    """Run on the splice relay, with the client read by Twisted's transport (see the subclasses for the others)."""

    splice = True
    polled = False

    def setUp(self) -> None:
        if not _splice.AVAILABLE and (self.splice or self.polled):
            raise unittest.SkipTest("splice(2) and the splice poller are Linux only")

    def proxied(self, **options: Any) -> tuple[Proxy, int, Any]:
        desc, backends = backend(self, Silent)
        proxy = Proxy(desc, splice=self.splice, **options)
        port, _ = mux(self, [Rule(AnyMatcher(), proxy, name="relay")])
        return proxy, port, backends

    async def relayed(self) -> tuple[Proxy, socket.socket, Any, Relay]:
        """A client that sent ``a request``, its silent backend's server protocol, and their relay, once it relays."""
        proxy, port, backends = self.proxied()
        client = raw_client(self, port)
        self.assertEqual(client.send(b"a request"), len(b"a request"))
        server = await wait(backends.arrived)
        await wait(server.made)
        (relay,) = proxy.relays
        await until(lambda: relay.side is not None, 5)
        return proxy, client, server, relay

    def client_watched(self) -> None:
        if not (self.splice or self.polled):
            raise unittest.SkipTest("a reactor transport not being read is not polled: its reset is not seen")

    async def test_a_client_reset_after_its_half_close_resets_the_backend_at_once(self) -> None:
        """A client that sends, half-closes, then resets, its backend silent and open, has its relay end at once."""
        self.client_watched()
        proxy, client, server, relay = await self.relayed()
        self.assertEqual(relay.spliced, self.splice)
        client.shutdown(socket.SHUT_WR)
        await until(lambda: client_read_closed(relay), 5)
        reset(client)
        handle = server.transport.getHandle()  # type: ignore[union-attr]
        await until(lambda: not proxy.relays, PROMPT)
        await until(lambda: closed_by_proxy(handle), PROMPT)
        # The client's reset counts against no backend.
        self.assertEqual(proxy.stats[proxy.backends[0].description].errors, {})
        # What the backend's kernel had taken before the reset is still read.
        server.transport.resumeProducing()  # type: ignore[union-attr]
        await wait(server.eof, 5)
        self.assertEqual(bytes(server.received), b"a request")

    async def test_a_client_reset_while_paused_resets_the_backend_at_once(self) -> None:
        """A client paused because its backend takes nothing that resets ends the relay at once."""
        self.client_watched()
        proxy, client, server, relay = await self.relayed()
        await until(stays_paused(relay, client), 20)
        reset(client)
        handle = server.transport.getHandle()  # type: ignore[union-attr]
        await until(lambda: not proxy.relays, PROMPT)
        await until(lambda: closed_by_proxy(handle), PROMPT)

    async def test_a_backend_reset_after_its_half_close_resets_the_client_at_once(self) -> None:
        """A backend that half-closes, then resets while its client neither sends nor closes ends the relay at once."""
        if not self.splice:
            raise unittest.SkipTest("a backend is a reactor transport on the Twisted relay")
        proxy, client, server, relay = await self.relayed()
        assert server.transport is not None
        server.transport.loseWriteConnection()  # type: ignore[attr-defined]
        splice = relay._splice
        assert splice is not None
        await until(lambda: splice.down.ended, 5)
        server.transport.abortConnection()  # type: ignore[attr-defined]
        await until(lambda: not proxy.relays, PROMPT)
        await until(lambda: closed_by_proxy(client), PROMPT)
        self.assertEqual(proxy.stats[proxy.backends[0].description].errors, {"reset": 1})

    async def test_a_half_close_while_paused_after_the_backends_is_a_clean_end(self) -> None:
        """
        A client paused because its backend takes nothing that half-closes
        after the backend has (its socket then hangs up, with no error)
        loses nothing: once the backend reads, every byte and the half-close
        reach it.
        """
        proxy, client, server, relay = await self.relayed()
        sent = len(b"a request")
        assert server.transport is not None
        server.transport.loseWriteConnection()

        def client_eof() -> bool:
            try:
                return client.recv(65536) == b""
            except BlockingIOError:
                return False

        await until(client_eof, 5)
        # The client sends only while the relay reads it, in small pieces,
        # so that what it sent last fits in the relay's socket: its end of
        # stream can arrive while the relay does not read.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        chunk = b"x" * 16384
        quiet = [0]

        def paused() -> bool:
            nonlocal sent
            if client_paused(relay):
                quiet[0] += 1
            else:
                quiet[0] = 0
                sent += send_all(client, chunk)
            return quiet[0] >= 20

        await until(paused, 20)
        client.shutdown(socket.SHUT_WR)
        ours = relay.transport.getHandle()  # type: ignore[union-attr]
        # Both ways shut on the relay's socket: a hang-up, with no error.
        await until(lambda: was_reset(ours), 5)
        # The relay's poller sees the hang-up in its next turns.
        for _ in range(5):
            await task.deferLater(R, 0.01, lambda: None)
        self.assertEqual(len(proxy.relays), 1)
        server.transport.resumeProducing()
        await wait(server.eof, 20)
        self.assertEqual(len(server.received), sent)
        await until(lambda: not proxy.relays, 5)

    async def test_a_client_reset_while_paused_for_its_backend_connect_ends_the_relay_at_once(self) -> None:
        """A client paused at the pending limit while its backend connects that resets ends its relay at once."""
        if not self.polled:
            raise unittest.SkipTest("only a client read by the splice poller is polled while paused")
        full = _full_listener(self)
        proxy = Proxy(f"tcp:host=127.0.0.1:port={full.getsockname()[1]}", splice=self.splice, connect_timeout=30)
        port, _ = mux(self, [Rule(AnyMatcher(), proxy, name="relay")])
        client = raw_client(self, port)
        client.send(b"a request")
        await until(lambda: len(proxy.relays) == 1, 5)
        (relay,) = proxy.relays
        await until(stays_paused(relay, client), 10)
        self.assertTrue(relay._paused)
        self.assertGreaterEqual(relay.buffered(), PENDING_LIMIT)
        reset(client)
        await until(lambda: not proxy.relays, PROMPT)


class UnreadResetTestsPolled(UnreadResetTests):
    polled = True


class UnreadResetTestsWithoutSplice(UnreadResetTests):
    splice = False


class UnreadResetTestsPolledWithoutSplice(UnreadResetTests):
    polled = True
    splice = False
