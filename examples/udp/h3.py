"""
A tiny HTTP/3 server and client with aioquic, for the UDP recipe and its
tests (``pip install aioquic``).

    python h3.py serve --port 0 --cert site.pem --key site.key --body "site a"
        prints "listening PORT" once ready, then answers every request with the body.
    python h3.py get https://a.test/ --connect 127.0.0.1:4433 --ca ca.pem
        prints the response status and body.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any
from urllib.parse import urlsplit

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent


class ServerProtocol(QuicConnectionProtocol):
    body = b""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._http: H3Connection | None = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if self._http is None:
            self._http = H3Connection(self._quic)
        for h3_event in self._http.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                headers = dict(h3_event.headers)
                body = self.body + b" " + headers.get(b":path", b"")
                self._http.send_headers(
                    h3_event.stream_id, [(b":status", b"200"), (b"content-length", str(len(body)).encode())]
                )
                self._http.send_data(h3_event.stream_id, body, end_stream=True)
        self.transmit()


class ClientProtocol(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._http = H3Connection(self._quic)
        self.done: asyncio.Future[tuple[bytes, bytes]] = asyncio.get_running_loop().create_future()
        self._status = b""
        self._body = b""

    def quic_event_received(self, event: QuicEvent) -> None:
        for h3_event in self._http.handle_event(event):
            self._h3(h3_event)

    def _h3(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            self._status = dict(event.headers).get(b":status", b"")
        elif isinstance(event, DataReceived):
            self._body += event.data
        if getattr(event, "stream_ended", False) and not self.done.done():
            self.done.set_result((self._status, self._body))

    async def get(self, url: str) -> tuple[bytes, bytes]:
        parts = urlsplit(url)
        stream_id = self._quic.get_next_available_stream_id()
        self._http.send_headers(
            stream_id,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", parts.netloc.encode()),
                (b":path", (parts.path or "/").encode()),
            ],
            end_stream=True,
        )
        self.transmit()
        return await self.done


async def _serve(args: argparse.Namespace) -> None:
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    config.load_cert_chain(args.cert, args.key)
    ServerProtocol.body = args.body.encode()
    server = await serve(args.host, args.port, configuration=config, create_protocol=ServerProtocol)
    port = server._transport.get_extra_info("sockname")[1]
    print(f"listening {port}", flush=True)
    await asyncio.Event().wait()


async def _get(args: argparse.Namespace) -> int:
    parts = urlsplit(args.url)
    host, _, port = args.connect.rpartition(":")
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=parts.hostname)
    config.load_verify_locations(args.ca)
    if args.extra_alpn:
        # Many extra ALPN values make the ClientHello span several Initial packets.
        config.alpn_protocols = [*H3_ALPN, *(f"x-padding-{i:03d}" for i in range(args.extra_alpn))]
    async with connect(host, int(port), configuration=config, create_protocol=ClientProtocol) as client:
        assert isinstance(client, ClientProtocol)
        status, body = await asyncio.wait_for(client.get(args.url), args.timeout)
    print(status.decode(), body.decode())
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--body", required=True)
    g = sub.add_parser("get")
    g.add_argument("url")
    g.add_argument("--connect", required=True)
    g.add_argument("--ca", required=True)
    g.add_argument("--extra-alpn", type=int, default=0)
    g.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    if args.command == "serve":
        asyncio.run(_serve(args))
        return 0
    return asyncio.run(_get(args))


if __name__ == "__main__":
    sys.exit(main())
