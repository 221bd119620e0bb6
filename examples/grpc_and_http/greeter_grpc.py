"""
A tiny gRPC server for unary calls, written on the ``h2`` library so that it
runs inside the same Twisted reactor as everything else on the port.

It is not a gRPC framework: it answers every unary call on
``/<service>/<method>`` with ``hello <request bytes>``, framed as gRPC
messages are (one flag byte, a 4-byte length, the payload), and ends the
stream with ``grpc-status: 0``. Swap in your own handler for real services.
"""

from __future__ import annotations

import struct

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, RequestReceived, StreamEnded
from twisted.internet.protocol import Factory, Protocol


def grpc_message(payload: bytes) -> bytes:
    """``payload`` as one uncompressed gRPC length-prefixed message."""
    return b"\x00" + struct.pack("!I", len(payload)) + payload


class GreeterProtocol(Protocol):
    """One HTTP/2 connection carrying gRPC calls."""

    def connectionMade(self) -> None:
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.bodies: dict[int, bytes] = {}
        self.transport.write(self.h2.data_to_send())

    def dataReceived(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, RequestReceived):
                self.bodies[event.stream_id] = b""
            elif isinstance(event, DataReceived):
                self.bodies[event.stream_id] += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                self._answer(event.stream_id)
        self.transport.write(self.h2.data_to_send())

    def _answer(self, stream_id: int) -> None:
        # The request body is one gRPC message: skip its 5-byte prefix.
        request = self.bodies.pop(stream_id)[5:]
        self.h2.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
        self.h2.send_data(stream_id, grpc_message(b"hello " + request))
        self.h2.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)


def greeter_factory() -> Factory:
    """The factory a rule hands gRPC connections to."""
    return Factory.forProtocol(GreeterProtocol)
