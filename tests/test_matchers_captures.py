"""
The protocol matchers against bytes captured from real client programs (see
``tests/captures.py``): every capture is routed to its own rule through a
real SniffingFactory whole, split at every byte boundary and one byte at a
time; every other protocol's matcher refuses it; and one listening port with
all the rules sends each client to its own service.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from muxtwist import Rule, SniffingFactory
from muxtwist.interfaces import IMatcher, Verdict
from muxtwist.matchers import (
    GRPC,
    HTTP1,
    HTTP2,
    MQTT,
    RDP,
    SOCKS4,
    SOCKS5,
    SSH,
    TLS,
    XMPP,
    OpenVPN,
    PostgreSQL,
    Redis,
    WebSocket,
)
from muxtwist.matchers.http2 import SETTINGS_FRAME
from muxtwist.testing import MemoryConnection
from tests.captures import Capture, all_captures, by_label
from tests.matcher_checks import INFO, monotonic_failure

#: The ACK a client sends for the SETTINGS frame a header matcher wrote.
SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"

DEADLINE = 15.0

#: Every protocol matcher, in an order where no rule can stall a later one:
#: the specific HTTP/2 and HTTP/1 matchers before the general ones.
MATCHERS: list[IMatcher] = [
    TLS(),
    GRPC(),
    HTTP2(),
    WebSocket(),
    HTTP1(),
    SSH(),
    Redis(),
    PostgreSQL(),
    MQTT(),
    SOCKS4(),
    SOCKS5(),
    XMPP(),
    RDP(),
    OpenVPN(),
]
#: Pairs where one protocol rides on the other, so both may claim it.
FAMILIES = [{"http1", "websocket"}, {"http2", "grpc"}]


class Recorder(protocol.Protocol):
    """Keeps what it receives and tells its factory when enough has come."""

    def connectionMade(self) -> None:
        self.received = b""
        self.factory.connections.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.factory.check()  # type: ignore[attr-defined]


class RecordingFactory(protocol.Factory):
    """A stand-in service: records each connection's bytes; ``wait(n)`` fires once ``n`` have come."""

    protocol = Recorder

    def __init__(self, name: str) -> None:
        self.name = name
        self.connections: list[Recorder] = []
        self._waiting: list[tuple[int, int, defer.Deferred[bytes]]] = []

    def check(self) -> None:
        for first, n, d in list(self._waiting):
            for c in self.connections[first:]:
                if len(c.received) >= n:
                    self._waiting.remove((first, n, d))
                    d.callback(c.received)
                    break

    def wait(self, n: int, first: int = 0) -> defer.Deferred[bytes]:
        """Fire with the bytes of the first connection from number ``first`` on to have received ``n``."""
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiting.append((first, n, d))
        self.check()
        return d


def make_rules() -> tuple[list[Rule], dict[str, RecordingFactory]]:
    """One rule per matcher, each to its own recording service."""
    services = {m.name: RecordingFactory(m.name) for m in MATCHERS}
    return [Rule(m, services[m.name]) for m in MATCHERS], services


def expected_rule(c: Capture) -> str:
    return c.protocol


def related(a: str, b: str) -> bool:
    return a == b or any({a, b} <= f for f in FAMILIES)


class _Routing(unittest.TestCase):
    def deliver(self, c: Capture, chunks: list[bytes], *, dribble: bool = False) -> None:
        """Send ``chunks`` through a fresh SniffingFactory and check the rule and the replayed bytes."""
        rules, services = make_rules()
        clock = Clock()
        conn = MemoryConnection(SniffingFactory(rules, reactor=clock), clock=clock)
        for chunk in chunks:
            conn.send(chunk, chunk_size=1 if dribble else None)
        conn.advance(0.05)
        written = conn.transport.value()
        if written == SETTINGS_FRAME and GRPC().filter_replay(c.data) == c.data:
            # The client sent its request before our SETTINGS reached it: it
            # acks them after its request, as curl does, and the sniffer
            # waits for that ACK so that the winner never gets it.
            self.assertIsNone(conn.rule_name, c.label)
            conn.send(SETTINGS_ACK)
            conn.advance(0.05)
        self.assertEqual(conn.rule_name, expected_rule(c), (c.label, [len(x) for x in chunks]))
        # The sniffer writes nothing but a responding matcher's declared bytes.
        self.assertIn(written, (b"", SETTINGS_FRAME))
        expected = c.data if not written else GRPC().filter_replay(c.data)
        (received,) = [r.received for r in services[expected_rule(c)].connections]
        self.assertEqual(received, expected)


def _routes_whole(label: str) -> Any:
    def test(self: _Routing) -> None:
        c = by_label(label)
        self.assertTrue(c.data)
        self.deliver(c, [c.data])

    test.__doc__ = f"{label}: the whole capture goes to its rule with every byte replayed."
    return test


def _routes_split(label: str) -> Any:
    def test(self: _Routing) -> None:
        c = by_label(label)
        for i in range(1, len(c.data)):
            self.deliver(c, [c.data[:i], c.data[i:]])

    test.__doc__ = f"{label}: split in two at every byte boundary, the capture still goes to its rule."
    return test


def _routes_dribbled(label: str) -> Any:
    def test(self: _Routing) -> None:
        c = by_label(label)
        self.deliver(c, [c.data], dribble=True)

    test.__doc__ = f"{label}: sent one byte at a time, the capture still goes to its rule."
    return test


LABELS = [c.label for c in all_captures()]


class WholeTests(_Routing):
    """Each capture, whole."""

    locals().update({f"test_{n.replace('-', '_')}": _routes_whole(n) for n in LABELS})


class SplitTests(_Routing):
    """Each capture, split at every byte boundary."""

    locals().update({f"test_{n.replace('-', '_')}": _routes_split(n) for n in LABELS})


class DribbleTests(_Routing):
    """Each capture, one byte at a time."""

    locals().update({f"test_{n.replace('-', '_')}": _routes_dribbled(n) for n in LABELS})


class CaptureFactsTests(unittest.TestCase):
    """What the captures themselves show."""

    def test_real_clients_captured(self) -> None:
        """Every client program sent something, and the spec-built captures are few and marked."""
        for c in all_captures():
            self.assertTrue(c.data, c.label)
        self.assertEqual(sorted({c.protocol for c in all_captures() if not c.real}), ["openvpn", "rdp", "xmpp"])

    def test_tls_captures_parsed(self) -> None:
        """The ClientHellos of openssl s_client and Python ssl carry the SNI and ALPN asked for."""
        self.assertVerdictOf(TLS(sni="www.example.com", alpn="h2"), "openssl-s_client-sni-alpn", Verdict.MATCH)
        self.assertVerdictOf(TLS(sni="*.example.com"), "openssl-s_client", Verdict.NO_MATCH)
        self.assertVerdictOf(TLS(sni="api.example.com", alpn=["http/1.1"]), "python-ssl-sni-alpn", Verdict.MATCH)
        self.assertVerdictOf(TLS(min_version="TLSv1.3"), "openssl-s_client-tls12", Verdict.NO_MATCH)
        self.assertVerdictOf(TLS(min_version="TLSv1.3"), "python-ssl", Verdict.MATCH)

    def test_grpcio_waits_for_settings(self) -> None:
        """grpcio sent its HEADERS only after the capturing server's SETTINGS, and ACKed them first."""
        data = by_label("grpcio").data
        ack = data.index(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
        self.assertLess(ack, data.index(b"application/grpc"))

    def assertVerdictOf(self, matcher: IMatcher, label: str, verdict: Verdict) -> None:
        self.assertIs(matcher.match(by_label(label).data, INFO), verdict)


class CrossMatrixTests(unittest.TestCase):
    """No matcher claims another protocol's real bytes."""

    def test_cross_matrix(self) -> None:
        """Every capture is NO_MATCH for every other protocol's matcher, NEED_MORE only on its shorter prefixes."""
        problems = []
        for c in all_captures():
            for m in MATCHERS:
                if related(m.name, c.protocol):
                    continue
                verdict = m.match(c.data, INFO)
                if verdict is not Verdict.NO_MATCH:
                    problems.append(f"{m.name} says {verdict.name} on {c.label}")
        self.assertEqual(problems, [])

    def test_monotonic_on_every_capture(self) -> None:
        """Every matcher decides monotonically over every prefix of every capture."""
        problems = [monotonic_failure(m, c.data) for c in all_captures() for m in MATCHERS]
        self.assertEqual([p for p in problems if p], [])

    def test_own_matcher_on_every_prefix(self) -> None:
        """A capture's own matcher says NEED_MORE on its prefixes up to the deciding byte, then MATCH."""
        own = {m.name: m for m in MATCHERS}
        for c in all_captures():
            verdicts = [own[c.protocol].match(c.data[:i], INFO) for i in range(len(c.data) + 1)]
            self.assertNotIn(Verdict.NO_MATCH, verdicts, c.label)
            self.assertIs(verdicts[-1], Verdict.MATCH, c.label)


class OnePortTests(unittest.TestCase):
    """All the rules on one real listening port."""

    def setUp(self) -> None:
        self.rules, self.services = make_rules()
        self.factory = SniffingFactory(self.rules)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.port.stopListening)

    def tearDown(self) -> defer.Deferred[None]:
        self.factory.abort_all()
        return self.factory.when_idle()

    @defer.inlineCallbacks
    def test_replayed_captures_reach_their_services(self) -> Any:
        """Each real capture, replayed by a socket client to the one port, reaches its own service intact."""
        for c in all_captures():
            client = yield protocol.ClientCreator(reactor, _Client).connectTCP("127.0.0.1", self.port.getHost().port)
            self.addCleanup(client.transport.abortConnection)
            expected = GRPC().filter_replay(c.data)
            service = self.services[expected_rule(c)]
            before = len(service.connections)
            if expected == c.data:
                client.transport.write(c.data)
            else:
                # Like grpcio: preface and SETTINGS, then wait for the server's SETTINGS before the rest.
                ack = c.data.index(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
                client.transport.write(c.data[:ack])
                settings = yield client.wait(len(SETTINGS_FRAME)).addTimeout(DEADLINE, reactor)
                self.assertEqual(settings, SETTINGS_FRAME)
                client.transport.write(c.data[ack:])
            received = yield service.wait(len(expected), before).addTimeout(DEADLINE, reactor)
            self.assertEqual(received, expected, c.label)
            self.assertEqual(len(service.connections), before + 1)

    @defer.inlineCallbacks
    def test_real_curl_and_redis_cli(self) -> Any:
        """curl and redis-cli themselves, pointed at the one port, are served by their own services."""
        root = Resource()
        root.putChild(b"hello", _Text())
        site = Site(root)
        pong = protocol.Factory.forProtocol(_Pong)
        rules = [Rule(m, site if m.name == "http1" else pong if m.name == "redis" else self.services[m.name])
                 for m in MATCHERS]  # fmt: skip
        self.factory.set_rules(rules)
        port = self.port.getHost().port
        out = yield _run(["curl", "-s", "-m", "10", f"http://127.0.0.1:{port}/hello"])
        self.assertEqual(out, b"from the web service")
        out = yield _run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), "PING"])
        self.assertEqual(out.strip(), b"PONG")


class _Client(protocol.Protocol):
    """A socket client that keeps what the server writes."""

    def __init__(self) -> None:
        self.received = b""
        self._waiting: list[tuple[int, defer.Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for n, d in list(self._waiting):
            if len(self.received) >= n:
                self._waiting.remove((n, d))
                d.callback(self.received)

    def wait(self, n: int) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiting.append((n, d))
        self.dataReceived(b"")
        return d


class _Text(Resource):
    """A page that says which service answered."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"from the web service"


class _Pong(protocol.Protocol):
    """Answers every RESP command with +PONG, which is all redis-cli PING needs."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"+PONG\r\n" * data.count(b"*"))  # type: ignore[union-attr]


class _Collect(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def processEnded(self, reason: Any) -> None:
        self.done.callback(self.out)


def _run(argv: list[str]) -> defer.Deferred[bytes]:
    pp = _Collect()
    process = reactor.spawnProcess(pp, argv[0], argv, env=dict(os.environ))  # type: ignore[attr-defined]

    def kill(result: Any) -> Any:
        if process.pid is not None:
            process.signalProcess("KILL")
        return result

    return pp.done.addTimeout(DEADLINE, reactor).addErrback(kill)
