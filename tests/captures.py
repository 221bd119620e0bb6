"""
Real client bytes for the matcher tests: each client program is run against a
capturing socket on 127.0.0.1 and what it sends first is recorded.

The capturing server answers nothing (except where a client must be told
something to go on, such as psql's SSL refusal), so each capture ends when
the client closes, or has been quiet for ``QUIET`` seconds (once it has sent
what follows such an answer), or at a deadline.
All captures are taken once per test process, in parallel.

Where no client program is installed (OpenVPN, XMPP, RDP), the bytes are
built here from the protocol specifications instead; they are marked so.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import attrs

from tests.processes import stop_group

#: A pause this long ends a capture: long enough for a client that writes
#: twice (curl's HTTP/2 preface, then its request) on a busy host.
QUIET = 2.0
DEADLINE = 15.0


@attrs.frozen
class Capture:
    """What one client sent: ``protocol`` is the matcher name that must claim it."""

    label: str
    protocol: str
    data: bytes
    real: bool = True


Respond = Callable[[bytes], bytes]


def capture(
    argv: Callable[[int], list[str]], respond: Respond | None = None, env: dict[str, str] | None = None
) -> bytes:
    """Run ``argv(port)`` and return the bytes it sent to ``port`` on 127.0.0.1."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(DEADLINE)
    port = listener.getsockname()[1]
    proc = subprocess.Popen(
        argv(port),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    data = bytearray()
    try:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(QUIET)
            end = time.monotonic() + DEADLINE
            #: How much the client had sent when it was answered (None: not answered).
            answered_at: int | None = None
            while time.monotonic() < end:
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    # Quiet: the client has sent what it sends first, unless it
                    # was answered and has not yet sent what follows the answer.
                    if data and (answered_at is None or len(data) > answered_at):
                        break
                    continue
                if not chunk:
                    break
                data += chunk
                if respond is not None and answered_at is None:
                    out = respond(bytes(data))
                    if out:
                        answered_at = len(data)
                        conn.sendall(out)
    finally:
        stop_group(proc)
        listener.close()
    return bytes(data)


def _python(code: str) -> Callable[[int], list[str]]:
    return lambda port: [sys.executable, "-c", code.replace("PORT", str(port))]


_PY_SSL = """
import socket, ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
{alpn}
s = socket.create_connection(("127.0.0.1", PORT))
ctx.wrap_socket(s, server_hostname={sni})
"""

_GRPC = """
import grpc
channel = grpc.insecure_channel("127.0.0.1:PORT")
call = channel.unary_unary("/muxtwist.test.Echo/Say")
call(b"hello", timeout=10)
"""

_SOCKS_TARGET = "http://target.example:80/"


def _psql(sslmode: str) -> Callable[[int], list[str]]:
    return lambda port: [
        "psql",
        f"host=127.0.0.1 port={port} user=alice dbname=shop sslmode={sslmode} gssencmode=disable connect_timeout=10",
        "-c",
        "select 1",
    ]


def _server_settings(data: bytes) -> bytes:
    # grpcio sends its preface and SETTINGS, then waits for the server's
    # SETTINGS before its request headers.
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    return b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" if data.startswith(preface) and len(data) >= 33 else b""


def _refuse_ssl(data: bytes) -> bytes:
    return b"N" if len(data) == 8 else b""


def _real_clients() -> list[tuple[str, str, Callable[[int], list[str]], Respond | None]]:
    def openssl(*extra: str) -> Callable[[int], list[str]]:
        return lambda port: ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *extra]

    return [
        ("python-ssl", "tls", _python(_PY_SSL.format(alpn="", sni="None")), None),
        (
            "python-ssl-sni-alpn",
            "tls",
            _python(_PY_SSL.format(alpn='ctx.set_alpn_protocols(["h2", "http/1.1"])', sni='"api.example.com"')),
            None,
        ),
        ("openssl-s_client", "tls", openssl("-noservername"), None),
        ("openssl-s_client-sni-alpn", "tls", openssl("-servername", "www.example.com", "-alpn", "h2,http/1.1"), None),
        ("openssl-s_client-tls12", "tls", openssl("-servername", "old.example.com", "-tls1_2"), None),
        ("curl-http1", "http1", lambda port: ["curl", "-s", "-m", "10", f"http://127.0.0.1:{port}/index.html"], None),
        (
            "curl-http2-prior-knowledge",
            "http2",
            lambda port: ["curl", "-s", "-m", "10", "--http2-prior-knowledge", f"http://127.0.0.1:{port}/"],
            None,
        ),
        ("grpcio", "grpc", _python(_GRPC), _server_settings),
        (
            "curl-websocket",
            "websocket",
            lambda port: [
                "curl",
                "-s",
                "-m",
                "10",
                "-H",
                "Connection: Upgrade",
                "-H",
                "Upgrade: websocket",
                "-H",
                "Sec-WebSocket-Version: 13",
                "-H",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                f"http://127.0.0.1:{port}/chat",
            ],
            None,
        ),
        ("redis-cli", "redis", lambda port: ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "PING"], None),
        (
            "ssh",
            "ssh",
            lambda port: [
                "ssh",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-p",
                str(port),
                "127.0.0.1",
                "true",
            ],
            None,
        ),
        ("psql-startup", "postgresql", _psql("disable"), None),
        ("psql-sslrequest", "postgresql", _psql("require"), None),
        ("psql-sslrequest-refused", "postgresql", _psql("prefer"), _refuse_ssl),
        (
            "mosquitto_pub",
            "mqtt",
            lambda port: ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", "t", "-m", "m", "-i", "cap"],
            None,
        ),
        (
            "mosquitto_pub-v5",
            "mqtt",
            lambda port: ["mosquitto_pub", "-V", "mqttv5", "-h", "127.0.0.1", "-p", str(port), "-t", "t", "-m", "m"],
            None,
        ),
        (
            "mosquitto_pub-v31",
            "mqtt",
            lambda port: ["mosquitto_pub", "-V", "mqttv31", "-h", "127.0.0.1", "-p", str(port), "-t", "t", "-m", "m"],
            None,
        ),
        (
            "curl-socks5",
            "socks5",
            lambda port: ["curl", "-s", "-m", "10", "--socks5", f"127.0.0.1:{port}", _SOCKS_TARGET],
            None,
        ),
        (
            "curl-socks4",
            "socks4",
            lambda port: ["curl", "-s", "-m", "10", "--socks4", f"127.0.0.1:{port}", "http://127.0.0.1:80/"],
            None,
        ),
        (
            "curl-socks4a",
            "socks4",
            lambda port: ["curl", "-s", "-m", "10", "--socks4a", f"127.0.0.1:{port}", _SOCKS_TARGET],
            None,
        ),
    ]


def openvpn_hard_reset(tls_auth_hmac: int = 0, *, opcode: int = 7, tlv: bool = True) -> bytes:
    """
    Built from the OpenVPN wire format (not captured: no client is installed):
    a TCP length prefix, then P_CONTROL_HARD_RESET_CLIENT (V2 unless
    ``opcode`` says otherwise) with key id 0, a session id, optionally a
    tls-auth HMAC of ``tls_auth_hmac`` bytes, replay packet id and time, an
    empty ACK array and message packet id 0, and (``tlv``) the
    early-negotiation TLV OpenVPN 2.6 clients append.
    """
    packet = bytes([opcode << 3]) + bytes.fromhex("5ac1d3f0a2b4c6e8")
    if tls_auth_hmac:
        packet += bytes(range(1, tls_auth_hmac + 1)) + (1).to_bytes(4, "big") + (1700000000).to_bytes(4, "big")
    packet += b"\x00" + (0).to_bytes(4, "big")
    if tlv:
        packet += bytes.fromhex("0f0f") + bytes.fromhex("0001000200 01".replace(" ", ""))
    return len(packet).to_bytes(2, "big") + packet


def openvpn_tls_crypt_reset(*, v2_key: bool = False) -> bytes:
    """
    Built from the OpenVPN wire format: a tls-crypt hard reset (V2), or with
    ``v2_key`` a tls-crypt-v2 one (V3) carrying the wrapped client key: session
    id, replay packet id 1 and time, a 32-byte tag, then the encrypted ACK
    array, message packet id and TLV (random-looking bytes here).
    """
    opcode = 10 if v2_key else 7
    packet = bytes([opcode << 3]) + bytes.fromhex("1e2d3c4b5a697887")
    packet += (1).to_bytes(4, "big") + (1700000000).to_bytes(4, "big") + bytes(range(100, 132))
    packet += bytes.fromhex("9c4f2a71e05b33d8d1f06e1a4b")
    if v2_key:
        wkc = bytes((i * 37 + 11) % 256 for i in range(290))
        packet += wkc + (len(wkc) + 2).to_bytes(2, "big")
    return len(packet).to_bytes(2, "big") + packet


def xmpp_stream_header() -> bytes:
    """Built from RFC 6120, section 4.2 (no XMPP client is installed): what clients such as Gajim send."""
    return (
        b"<?xml version='1.0'?>"
        b"<stream:stream to='chat.example.com' version='1.0' xml:lang='en' "
        b"xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
    )


def rdp_connection_request(*, correlation: bool = False) -> bytes:
    """
    Built from [MS-RDPBCGR] 2.2.1.1 (no RDP client is installed): TPKT, an
    X.224 Connection Request with an mstshash cookie, and an RDP_NEG_REQ
    asking for TLS and CredSSP, as mstsc and FreeRDP send it; with
    ``correlation``, its CORRELATION_INFO_PRESENT flag and the
    RDP_NEG_CORRELATION_INFO after it (2.2.1.1.2), as gateways' clients send.
    """
    cookie = b"Cookie: mstshash=alice\r\n"
    flags = 0x08 if correlation else 0
    neg = bytes([1, flags]) + (8).to_bytes(2, "little") + (3).to_bytes(4, "little")
    if correlation:
        neg += (
            bytes([6, 0]) + (36).to_bytes(2, "little") + bytes.fromhex("5f3a9c0e11d24b7c8e6a4d2b7f1e9a30") + bytes(16)
        )
    x224 = bytes([0xE0, 0, 0, 0x12, 0x34, 0]) + cookie + neg
    body = bytes([len(x224)]) + x224
    return bytes([3, 0]) + (4 + len(body)).to_bytes(2, "big") + body


@functools.cache
def all_captures() -> tuple[Capture, ...]:
    """Every capture, real ones taken once per process in parallel, then the spec-built ones."""
    clients = _real_clients()
    with ThreadPoolExecutor(max_workers=len(clients)) as pool:
        futures = [(label, proto, pool.submit(capture, argv, respond)) for label, proto, argv, respond in clients]
        real = [Capture(label, proto, f.result()) for label, proto, f in futures]
    built = [
        Capture("openvpn-hard-reset", "openvpn", openvpn_hard_reset(), real=False),
        Capture("openvpn-hard-reset-tls-auth", "openvpn", openvpn_hard_reset(20), real=False),
        Capture("openvpn-hard-reset-tls-auth-md5", "openvpn", openvpn_hard_reset(16), real=False),
        Capture("openvpn-hard-reset-tls-auth-sha224", "openvpn", openvpn_hard_reset(28), real=False),
        Capture("openvpn-hard-reset-tls-auth-sha512", "openvpn", openvpn_hard_reset(64), real=False),
        Capture("openvpn-hard-reset-tls-crypt", "openvpn", openvpn_tls_crypt_reset(), real=False),
        Capture("openvpn-hard-reset-tls-crypt-v2", "openvpn", openvpn_tls_crypt_reset(v2_key=True), real=False),
        Capture("xmpp-stream", "xmpp", xmpp_stream_header(), real=False),
        Capture("rdp-connection-request", "rdp", rdp_connection_request(), real=False),
        Capture("rdp-connection-request-correlation", "rdp", rdp_connection_request(correlation=True), real=False),
    ]
    return (*real, *built)


def by_label(label: str) -> Capture:
    """One capture by its label."""
    for c in all_captures():
        if c.label == label:
            return c
    raise KeyError(label)
