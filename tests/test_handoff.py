"""
After the handoff the sniffer is out of the data path, at any nesting depth:
data goes from Twisted's transport straight to the winner (no muxtwist frame
on the stack under its ``dataReceived``), the winner's object is left as its
factory built it, and each sniffer still reports the connection's end once,
with its bytes and outcome. Real sockets on 127.0.0.1, driven by the reactor.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol, reactor, ssl, task
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocol, IProtocolFactory, ITransport
from twisted.protocols.wire import Echo
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

import muxtwist
from muxtwist.actions import Proxy, TerminateTLS
from muxtwist.interfaces import ConnectionEnd
from muxtwist.matchers import HTTP1, TLS, Prefix
from muxtwist.metrics import Metrics
from muxtwist.sniffing import Rule, SniffingFactory
from muxtwist.testing import MemoryConnection
from tests.certs import make_ca, make_certificate

PACKAGE = os.path.dirname(os.path.abspath(muxtwist.__file__)) + os.sep

Stack = list[traceback.FrameSummary]


def muxtwist_frames(stack: Stack) -> list[str]:
    """The frames of ``stack`` that run code of the muxtwist package."""
    return [f"{f.filename}:{f.lineno} {f.name}" for f in stack if os.path.abspath(f.filename).startswith(PACKAGE)]


class RecordingMetrics(Metrics):
    """Metrics that also keep each ConnectionEnd they are told of."""

    def __init__(self) -> None:
        super().__init__()
        self.ends: list[ConnectionEnd] = []
        self._waiting: list[tuple[int, defer.Deferred[None]]] = []

    def connection_end(self, end: ConnectionEnd) -> None:
        self.ends.append(end)
        super().connection_end(end)
        ready = [d for n, d in self._waiting if len(self.ends) >= n]
        self._waiting = [(n, d) for n, d in self._waiting if len(self.ends) < n]
        for d in ready:
            d.callback(None)

    def ended(self, count: int = 1) -> defer.Deferred[None]:
        """Fires once ``count`` ends have been told."""
        if len(self.ends) >= count:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((count, d))
        return d


class Seen:
    """
    What the winners of one test saw: each chunk with the stack under its
    ``dataReceived``, and how many times they were told of the end. The first
    chunk is answered ``ready``; a chunk saying ``close`` or ``abort`` makes
    the winner end the connection so.
    """

    def __init__(self) -> None:
        self.chunks: list[tuple[bytes, Stack]] = []
        self.lost = 0
        self.after: defer.Deferred[Stack] = defer.Deferred()

    def received(self, transport: Any, data: bytes) -> None:
        stack = traceback.extract_stack()
        self.chunks.append((data, stack))
        if len(self.chunks) == 1:
            transport.write(b"ready")
        if data.startswith(b"after"):
            if b"close" in data:
                transport.loseConnection()
            elif b"abort" in data:
                transport.abortConnection()
            self.after.callback(stack)


class PlainWinner(protocol.Protocol):
    """An ordinary Protocol."""

    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    def dataReceived(self, data: bytes) -> None:
        self.seen.received(self.transport, data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.seen.lost += 1


@implementer(IProtocol)
class SlottedWinner:
    """A protocol with ``__slots__``: no instance attribute can be added to it."""

    __slots__ = ("connected", "seen", "transport")

    def __init__(self, seen: Seen) -> None:
        self.seen = seen
        self.transport: ITransport | None = None
        self.connected = 0

    def makeConnection(self, transport: ITransport) -> None:
        self.transport = transport
        self.connected = 1
        self.connectionMade()

    def connectionMade(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        self.seen.received(self.transport, data)

    def connectionLost(self, reason: Failure) -> None:
        self.connected = 0
        self.seen.lost += 1

    def logPrefix(self) -> str:
        return "SlottedWinner"


def builds(make: Callable[[], IProtocol]) -> IProtocolFactory:
    """A factory whose protocols ``make`` builds."""

    class Builds(protocol.Factory):
        def buildProtocol(self, addr: IAddress) -> IProtocol:
            return make()

    return Builds()


class Client(protocol.Protocol):
    """Sends ``opener``; once the server has answered ``ready``, sends ``then``."""

    def __init__(self, opener: bytes, then: bytes, ready: bytes = b"ready") -> None:
        self.opener, self.then, self.ready = opener, then, ready
        self.received = b""
        self.sent = False
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.opener)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.sent and self.ready in self.received:
            self.sent = True
            assert self.transport is not None
            self.transport.write(self.then)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost.callback(None)


class _Loopback(unittest.TestCase):
    timeout = 30

    def listen(self, factory: IProtocolFactory, context: Any = None) -> int:
        port: IListeningPort
        if context is None:
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        else:
            port = reactor.listenSSL(0, factory, context, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        number: int = port.getHost().port  # type: ignore[attr-defined]
        return number

    async def connect(self, port: int, client: Client, tls: Any = None) -> Client:
        creator = protocol.ClientCreator(reactor, lambda: client)
        if tls is None:
            await creator.connectTCP("127.0.0.1", port)
        else:
            await creator.connectSSL("127.0.0.1", port, tls)
        self.addCleanup(_drop, client)
        return client

    async def turn(self) -> None:
        """Let the reactor run what it has queued (a duplicate end would come now)."""
        await task.deferLater(reactor, 0, lambda: None)


async def until(condition: Callable[[], bool], what: str, seconds: float = 30.0) -> None:
    """Wait, without blocking the reactor, until ``condition()`` holds; fail after ``seconds``."""
    deadline = reactor.seconds() + seconds  # type: ignore[attr-defined]
    while not condition():
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            raise AssertionError(f"not seen within {seconds} s: {what}")
        await task.deferLater(reactor, 0.01, lambda: None)


def _drop(client: Client) -> defer.Deferred[None] | None:
    """Cleanup: close a client still connected and wait for it."""
    if client.lost.called or client.transport is None:
        return None
    client.transport.abortConnection()  # type: ignore[attr-defined]
    return client.lost


#: How a test ends its connection: the winner closes, the client closes, or the winner aborts.
ENDINGS = {"winner": b"after close", "client": b"after", "abort": b"after abort"}


class NestedHandoffTests(_Loopback):
    """Outer SniffingFactory -> a rule whose factory is another SniffingFactory -> a plain Protocol."""

    async def exchange(self, ending: str) -> tuple[Stack, RecordingMetrics, RecordingMetrics, Seen]:
        seen = Seen()
        outer_metrics, inner_metrics = RecordingMetrics(), RecordingMetrics()
        inner = SniffingFactory(
            [Rule(Prefix(b"OUTIX"), builds(lambda: PlainWinner(seen)), name="inner")], metrics=inner_metrics
        )
        outer = SniffingFactory([Rule(Prefix(b"OUT"), inner, name="nest")], metrics=outer_metrics)
        port = self.listen(outer)
        client = await self.connect(port, Client(b"OUTIX hello", ENDINGS[ending]))
        stack = await seen.after
        if ending == "client":
            assert client.transport is not None
            client.transport.loseConnection()
        await client.lost
        await outer_metrics.ended()
        await inner_metrics.ended()
        await self.turn()
        return stack, outer_metrics, inner_metrics, seen

    def check_ends(self, outer: RecordingMetrics, inner: RecordingMetrics, seen: Seen) -> None:
        self.assertEqual(
            [(e.rule, e.outcome, e.sniffed_in, e.sniffed_out, e.relayed_in) for e in outer.ends],
            [("nest", "handed_off", 11, 0, None)],
        )
        self.assertEqual(
            [(e.rule, e.outcome, e.sniffed_in, e.sniffed_out, e.relayed_in) for e in inner.ends],
            [("inner", "handed_off", 11, 0, None)],
        )
        self.assertEqual(seen.lost, 1)

    async def test_two_level_nested_handoff_leaves_the_data_path(self) -> None:
        """After a two-level nested handoff, no muxtwist frame is on the stack of the innermost dataReceived."""
        stack, outer, inner, seen = await self.exchange("client")
        self.assertEqual([data for data, _ in seen.chunks], [b"OUTIX hello", b"after"])
        # The replay is the sniffer's call; what comes after is Twisted's alone.
        self.assertTrue(muxtwist_frames(seen.chunks[0][1]))
        self.assertEqual(muxtwist_frames(stack), [])
        self.check_ends(outer, inner, seen)

    async def test_nested_end_reported_once_when_the_winner_closes(self) -> None:
        """The winner closing a nested handoff: each sniffer reports one end, with the sniffed bytes."""
        stack, outer, inner, seen = await self.exchange("winner")
        self.assertEqual(muxtwist_frames(stack), [])
        self.check_ends(outer, inner, seen)

    async def test_nested_end_reported_once_when_the_winner_aborts(self) -> None:
        """The winner aborting a nested handoff: each sniffer reports one end, with the sniffed bytes."""
        stack, outer, inner, seen = await self.exchange("abort")
        self.assertEqual(muxtwist_frames(stack), [])
        self.check_ends(outer, inner, seen)

    async def test_inner_end_is_reported_before_the_outer(self) -> None:
        """Nested sniffers on one transport report innermost first, as the inner connection ends inside the outer."""
        order: list[str] = []
        seen = Seen()

        class Ordered(RecordingMetrics):
            def __init__(self, name: str) -> None:
                super().__init__()
                self.name = name

            def connection_end(self, end: ConnectionEnd) -> None:
                order.append(self.name)
                super().connection_end(end)

        outer_metrics, inner_metrics = Ordered("outer"), Ordered("inner")
        inner = SniffingFactory([Rule(Prefix(b"OUTIX"), builds(lambda: PlainWinner(seen)))], metrics=inner_metrics)
        outer = SniffingFactory([Rule(Prefix(b"OUT"), inner)], metrics=outer_metrics)
        client = await self.connect(self.listen(outer), Client(b"OUTIX hello", b"after close"))
        await client.lost
        await outer_metrics.ended()
        self.assertEqual(order, ["inner", "outer"])
        self.assertEqual(outer.connections, set())
        self.assertEqual(inner.connections, set())

    async def test_nested_proxy_relay_bytes_reported_by_the_inner_sniffer(self) -> None:
        """A nested handoff to a Proxy: the inner sniffer reports the relayed bytes, the outer the sniffed ones."""
        backend = self.listen(protocol.Factory.forProtocol(Echo))
        outer_metrics, inner_metrics = RecordingMetrics(), RecordingMetrics()
        relay = Proxy(f"tcp:host=127.0.0.1:port={backend}")
        inner = SniffingFactory([Rule(Prefix(b"OUTIX"), relay, name="inner")], metrics=inner_metrics)
        outer = SniffingFactory([Rule(Prefix(b"OUT"), inner, name="nest")], metrics=outer_metrics)
        # The echo of the opener is the cue to send more.
        client = await self.connect(self.listen(outer), Client(b"OUTIX hello", b"after", ready=b"OUTIX hello"))
        await until(lambda: client.received == b"OUTIX helloafter", "the echo of both writes")
        assert client.transport is not None
        client.transport.loseConnection()
        await client.lost
        await outer_metrics.ended()
        await inner_metrics.ended()
        await self.turn()
        self.assertEqual(
            [(e.rule, e.outcome, e.sniffed_in, e.relayed_in, e.relayed_out) for e in outer_metrics.ends],
            [("nest", "handed_off", 11, None, None)],
        )
        self.assertEqual(
            [(e.rule, e.outcome, e.sniffed_in, e.relayed_in, e.relayed_out) for e in inner_metrics.ends],
            [("inner", "handed_off", 11, 16, 16)],
        )


class SlottedWinnerTests(_Loopback):
    """A winner with ``__slots__`` gets the connection fully, and its end is reported once."""

    async def exchange(self, ending: str) -> None:
        seen = Seen()
        metrics = RecordingMetrics()
        factory = SniffingFactory(
            [Rule(Prefix(b"SLOT"), builds(lambda: SlottedWinner(seen)), name="slotted")], metrics=metrics
        )
        client = await self.connect(self.listen(factory), Client(b"SLOTTED", ENDINGS[ending]))
        stack = await seen.after
        if ending == "client":
            assert client.transport is not None
            client.transport.loseConnection()
        await client.lost
        await metrics.ended()
        await self.turn()
        self.assertEqual(muxtwist_frames(stack), [])
        self.assertEqual(
            [(e.rule, e.outcome, e.sniffed_in, e.sniffed_out, e.relayed_in) for e in metrics.ends],
            [("slotted", "handed_off", 7, 0, None)],
        )
        self.assertEqual(seen.lost, 1)
        self.assertEqual(factory.connections, set())
        self.assertEqual(factory.stats["slotted"].active, 0)

    async def test_slotted_winner_client_closes(self) -> None:
        """A __slots__ winner receives straight from the transport; the client's close is reported once."""
        await self.exchange("client")

    async def test_slotted_winner_closes(self) -> None:
        """A __slots__ winner receives straight from the transport; its own close is reported once."""
        await self.exchange("winner")

    async def test_slotted_winner_aborts(self) -> None:
        """A __slots__ winner receives straight from the transport; its abort is reported once."""
        await self.exchange("abort")


class Page(Resource):
    """Answers each GET with ``page N``, keeping the stack under each render."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.stacks: list[Stack] = []

    def render_GET(self, request: Request) -> bytes:
        self.stacks.append(traceback.extract_stack())
        return b"page %d" % len(self.stacks)


class SiteTests(_Loopback):
    """A twisted.web Site behind the sniffer: its HTTP channel (a proxyForInterface) leaves the data path too."""

    FIRST = b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\n"

    async def exchange(self, ending: str) -> None:
        page = Page()
        metrics = RecordingMetrics()
        factory = SniffingFactory([Rule(HTTP1(), Site(page), name="web")], metrics=metrics)
        second = b"GET /2 HTTP/1.1\r\nHost: t\r\n" + (b"Connection: close\r\n" if ending == "winner" else b"") + b"\r\n"
        client = await self.connect(self.listen(factory), Client(self.FIRST, second, ready=b"page 1"))
        await until(lambda: b"page 2" in client.received or client.lost.called, "the second page or the close")
        if ending == "client":
            assert client.transport is not None
            client.transport.loseConnection()
        elif ending == "abort":
            factory.abort_all()
        await client.lost
        await metrics.ended()
        await self.turn()
        self.assertEqual(len(page.stacks), 2)
        self.assertTrue(muxtwist_frames(page.stacks[0]))
        self.assertEqual(muxtwist_frames(page.stacks[1]), [])
        self.assertEqual(
            [(e.rule, e.outcome, e.sniffed_in, e.sniffed_out, e.relayed_in) for e in metrics.ends],
            [("web", "handed_off", len(self.FIRST), 0, None)],
        )
        self.assertEqual(factory.connections, set())

    async def test_keep_alive_request_has_no_muxtwist_frame(self) -> None:
        """The second request on a kept-alive connection reaches the Site with no muxtwist frame on the stack."""
        await self.exchange("client")

    async def test_site_closing_is_reported_once(self) -> None:
        """A Site closing the connection (Connection: close) is one connection_end."""
        await self.exchange("winner")

    async def test_abort_is_reported_once(self) -> None:
        """Aborting a connection handed to a Site (abort_all) is one connection_end."""
        await self.exchange("abort")


class TLSHandoffTests(_Loopback):
    """TerminateTLS -> a nested SniffingFactory -> a plain Protocol, the inner sniffer behind Twisted's TLS layer."""

    async def exchange(self, ending: str) -> None:
        ca = make_ca()
        leaf = make_certificate("a.test", ca=ca)
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, "DEFAULT.pem"), "wb") as f:
            f.write(leaf.cert_pem + leaf.key_pem)
        seen = Seen()
        outer_metrics, inner_metrics = RecordingMetrics(), RecordingMetrics()
        inner = SniffingFactory(
            [Rule(Prefix(b"IN"), builds(lambda: PlainWinner(seen)), name="inner")], metrics=inner_metrics
        )
        outer = SniffingFactory([Rule(TLS(), TerminateTLS(directory, inner), name="tls")], metrics=outer_metrics)
        options = ssl.optionsForClientTLS("a.test", ssl.Certificate.loadPEM(ca.cert_pem))
        client = await self.connect(self.listen(outer), Client(b"INSIDE", ENDINGS[ending]), tls=options)
        stack = await seen.after
        if ending == "client":
            assert client.transport is not None
            client.transport.loseConnection()
        await client.lost
        await outer_metrics.ended()
        await inner_metrics.ended()
        await self.turn()
        self.assertEqual(muxtwist_frames(stack), [])
        self.assertEqual(
            [(e.rule, e.outcome, e.sniffed_in, e.sniffed_out, e.relayed_in) for e in inner_metrics.ends],
            [("inner", "handed_off", 6, 0, None)],
        )
        self.assertEqual([(e.rule, e.outcome) for e in outer_metrics.ends], [("tls", "handed_off")])
        self.assertGreater(outer_metrics.ends[0].sniffed_in, 0)
        self.assertEqual(seen.lost, 1)

    async def test_tls_client_closes(self) -> None:
        """Over TLS, the client's close is one connection_end from each sniffer."""
        await self.exchange("client")

    async def test_tls_winner_closes(self) -> None:
        """Over TLS, the winner's close is one connection_end from each sniffer."""
        await self.exchange("winner")

    async def test_tls_winner_aborts(self) -> None:
        """Over TLS, the winner's abort is one connection_end from each sniffer."""
        await self.exchange("abort")


class WinnerUntouchedTests(_Loopback):
    async def test_winner_object_is_not_patched(self) -> None:
        """The handed-off winner keeps its class's connectionLost: nothing is set on its instance."""
        seen = Seen()
        winners: list[PlainWinner] = []

        def make() -> PlainWinner:
            winners.append(PlainWinner(seen))
            return winners[-1]

        metrics = RecordingMetrics()
        factory = SniffingFactory([Rule(Prefix(b"PLAIN"), builds(make))], metrics=metrics)
        client = await self.connect(self.listen(factory), Client(b"PLAIN", b"after"))
        await seen.after
        self.assertNotIn("connectionLost", vars(winners[0]))
        assert client.transport is not None
        client.transport.loseConnection()
        await metrics.ended()
        self.assertEqual(len(metrics.ends), 1)


class HookMemoryTests(unittest.SynchronousTestCase):
    def test_end_hook_is_small(self) -> None:
        """The end hook a handed-off connection keeps on its transport for its life takes under 100 bytes."""
        clock = task.Clock()
        winners = protocol.Factory.forProtocol(protocol.Protocol)
        factory = SniffingFactory([Rule(Prefix(b"hell"), winners, name="hello")], reactor=clock)
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"hello")
        hook = vars(conn.transport)["connectionLost"]
        self.assertFalse(hasattr(hook, "__dict__"))
        self.assertLess(sys.getsizeof(hook), 100)
        conn.close()
        self.assertEqual(factory.stats["hello"].outcomes, {"handed_off": 1})
        self.assertNotIn("connectionLost", vars(conn.transport))
