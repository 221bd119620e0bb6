"""
Representative first bytes of each protocol, built here (a real ClientHello
from Python's ssl module, the others from their specifications), for load
that needs many connections fast. The byte-dribble scenario uses the real
client captures of ``tests/captures.py`` instead.
"""

from __future__ import annotations

import ssl

__all__ = ["OPENERS", "client_hello"]


def client_hello(server_name: str = "api.example.com") -> bytes:
    """The ClientHello Python's ssl module sends, with SNI and ALPN."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _postgres_startup() -> bytes:
    body = (196608).to_bytes(4, "big") + b"user\0alice\0database\0shop\0\0"
    return (len(body) + 4).to_bytes(4, "big") + body


def _mqtt_connect() -> bytes:
    variable = b"\x00\x04MQTT\x04\x02\x00\x3c"
    payload = b"\x00\x03abc"
    return bytes([0x10, len(variable) + len(payload)]) + variable + payload


#: service name -> the first bytes a client of it sends.
OPENERS: dict[str, bytes] = {
    "tls": client_hello(),
    "ssh": b"SSH-2.0-OpenSSH_9.6p1 Debian-4\r\n",
    "websocket": (
        b"GET /chat HTTP/1.1\r\nHost: api.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ),
    "http1-www": b"POST /upload HTTP/1.1\r\nHost: www.example.com\r\nContent-Type: application/octet-stream\r\n\r\n",
    "http1": b"POST /upload HTTP/1.1\r\nHost: api.example.com\r\nContent-Type: application/octet-stream\r\n\r\n",
    "redis": b"*2\r\n$4\r\nECHO\r\n$5\r\nhello\r\n",
    "postgresql": _postgres_startup(),
    "mqtt": _mqtt_connect(),
    "socks5": b"\x05\x01\x00",
    "prefix": b"MUXECHO hello\n",
    "regex": b"42 HELLO\r\n",
}
