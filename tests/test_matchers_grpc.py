"""
gRPC clients that wait for the server's SETTINGS before sending their request
headers: the sniffer must write SETTINGS for them, and the HTTP/2 server the
connection is handed to must not be confused by the client's ACK of them.

The server is a small ``h2``-library server on a real SniffingFactory port;
the clients are an ``h2``-library client that waits for SETTINGS before its
HEADERS, and grpcio itself (which also waits).
"""

from __future__ import annotations

import os
from typing import Any

import h2.config
import h2.connection
import h2.events
from twisted.internet import defer, protocol, reactor, threads
from twisted.trial import unittest

from muxtwist import Rule, SniffingFactory
from muxtwist.matchers import GRPC, HTTP1, HTTP2, TLS, HTTP2Header
from muxtwist.matchers.http2 import SETTINGS_FRAME

DEADLINE = 15.0


class H2Server(protocol.Protocol):
    """Answers each request with its body echoed as a gRPC response, and keeps the h2 events it saw."""

    def connectionMade(self) -> None:
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.events: list[h2.events.Event] = []
        self.bodies: dict[int, bytes] = {}
        self.conn.initiate_connection()
        self.transport.write(self.conn.data_to_send())  # type: ignore[union-attr]
        self.factory.servers.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            self.events.append(event)
            if isinstance(event, h2.events.DataReceived):
                self.bodies[event.stream_id] = self.bodies.get(event.stream_id, b"") + event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self._answer(event.stream_id)
        self.transport.write(self.conn.data_to_send())  # type: ignore[union-attr]

    def _answer(self, stream_id: int) -> None:
        self.conn.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
        self.conn.send_data(stream_id, self.bodies.get(stream_id, b""))
        self.conn.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)


class WaitingClient(protocol.Protocol):
    """
    An h2 client that sends its preface and SETTINGS, then waits for the
    server's SETTINGS (as grpc-java does) before sending a gRPC request.
    """

    def __init__(self, message: bytes) -> None:
        self.message = message
        self.sent_headers_after_settings = False
        self.received_before_headers = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.trailers: list[tuple[bytes, bytes]] = []
        self.done: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.transport.write(self.conn.data_to_send())  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if not self.sent_headers_after_settings:
            self.received_before_headers += data
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RemoteSettingsChanged) and not self.sent_headers_after_settings:
                self.sent_headers_after_settings = True
                self.transport.write(self.conn.data_to_send())  # type: ignore[union-attr]
                self.conn.send_headers(
                    1,
                    [
                        (":method", "POST"),
                        (":scheme", "http"),
                        (":path", "/muxtwist.test.Echo/Say"),
                        (":authority", "127.0.0.1"),
                        ("content-type", "application/grpc"),
                        ("te", "trailers"),
                    ],
                )
                self.conn.send_data(1, self.message, end_stream=True)
            elif isinstance(event, h2.events.ResponseReceived):
                self.headers = list(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.DataReceived):
                self.body += event.data
            elif isinstance(event, h2.events.TrailersReceived):
                self.trailers = list(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.StreamEnded) and not self.done.called:
                self.done.callback(None)
        self.transport.write(self.conn.data_to_send())  # type: ignore[union-attr]


def _grpc_message(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


class GRPCSettingsTests(unittest.TestCase):
    """The sniffer answers a waiting gRPC client, and the real server is served the request cleanly."""

    def setUp(self) -> None:
        self.grpc_service = protocol.Factory.forProtocol(H2Server)
        self.grpc_service.servers = []  # type: ignore[attr-defined]
        self.other = protocol.Factory.forProtocol(protocol.Protocol)
        rules = [
            Rule(TLS(), self.other),
            Rule(HTTP2Header(":path", prefix="/admin/"), self.other, name="admin"),
            Rule(GRPC(), self.grpc_service),
            Rule(HTTP2(), self.other),
            Rule(HTTP1(), self.other),
        ]
        self.factory = SniffingFactory(rules)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.port.stopListening)

    def tearDown(self) -> defer.Deferred[None]:
        self.factory.abort_all()
        return self.factory.when_idle()

    @property
    def servers(self) -> list[H2Server]:
        servers: list[H2Server] = self.grpc_service.servers  # type: ignore[attr-defined]
        return servers

    @defer.inlineCallbacks
    def test_waiting_h2_client_is_served(self) -> Any:
        """A client that waits for SETTINGS gets the sniffer's SETTINGS, then its request is answered."""
        client = WaitingClient(_grpc_message(b"hello"))
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", self.port.getHost().port)
        self.addCleanup(client.transport.abortConnection)  # type: ignore[union-attr]
        yield client.done.addTimeout(DEADLINE, reactor)
        # The first bytes the client saw were the sniffer's SETTINGS, before any HEADERS were sent.
        self.assertTrue(client.received_before_headers.startswith(SETTINGS_FRAME))
        self.assertIn((b":status", b"200"), client.headers)
        self.assertEqual(client.body, _grpc_message(b"hello"))
        self.assertIn((b"grpc-status", b"0"), client.trailers)
        (server,) = self.servers
        self.assertNoEarlyAck(server)
        self.assertFalse([e for e in server.events if isinstance(e, h2.events.ConnectionTerminated)])
        self.assertEqual(self.factory.stats["grpc"].total, 1)

    @defer.inlineCallbacks
    def test_grpcio_client_is_served(self) -> Any:
        """grpcio, which also waits for SETTINGS, gets its unary call answered through the sniffer."""
        port = self.port.getHost().port

        def call() -> bytes:
            import grpc

            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                answer: bytes = channel.unary_unary("/muxtwist.test.Echo/Say")(b"ping", timeout=10)
                return answer

        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
        answer = yield threads.deferToThread(call).addTimeout(DEADLINE, reactor)
        self.assertEqual(answer, b"ping")
        (server,) = self.servers
        self.assertNoEarlyAck(server)
        self.assertEqual(self.factory.stats["grpc"].total, 1)

    def assertNoEarlyAck(self, server: H2Server) -> None:
        """
        The client's ACK of the sniffer's SETTINGS was sent before its HEADERS; had it reached
        the server, the server would have seen an ACK before the request, for SETTINGS the
        client had not even received yet.
        """
        kinds = [type(e) for e in server.events]
        self.assertIn(h2.events.RequestReceived, kinds)
        self.assertNotIn(h2.events.SettingsAcknowledged, kinds[: kinds.index(h2.events.RequestReceived)])
