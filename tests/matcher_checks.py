"""
Helpers shared by the protocol matcher tests: valid first messages built in
process (by the ``ssl`` module, the ``h2`` library, or from the protocol
specifications), a hypothesis strategy that mutates them, and the
monotonicity check.
"""

from __future__ import annotations

import ssl

import h2.config
import h2.connection
from hypothesis import strategies as st

from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from tests.captures import openvpn_hard_reset, openvpn_tls_crypt_reset, rdp_connection_request, xmpp_stream_header

INFO = ConnectionInfo()


def ssl_client_hello(sni: str | None = "api.example.com", alpn: list[str] | None = None) -> bytes:
    """The ClientHello Python's ``ssl`` module writes, taken from a memory BIO."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _vector(data: bytes, length_bytes: int) -> bytes:
    return len(data).to_bytes(length_bytes, "big") + data


def client_hello_body(
    *,
    sni: str | None = None,
    alpn: tuple[bytes, ...] = (),
    versions: tuple[int, ...] | None = None,
    padding: int = 0,
    legacy_version: int = 0x0303,
    extra_extensions: bytes = b"",
) -> bytes:
    """A ClientHello body written from RFC 8446 section 4.1.2, independently of the parser."""
    extensions = b""
    if sni is not None:
        entry = b"\x00" + _vector(sni.encode(), 2)
        extensions += (0).to_bytes(2, "big") + _vector(_vector(entry, 2), 2)
    if alpn:
        extensions += (16).to_bytes(2, "big") + _vector(_vector(b"".join(_vector(p, 1) for p in alpn), 2), 2)
    if versions is not None:
        vs = b"".join(v.to_bytes(2, "big") for v in versions)
        extensions += (43).to_bytes(2, "big") + _vector(_vector(vs, 1), 2)
    if padding:
        extensions += (21).to_bytes(2, "big") + _vector(b"\x00" * padding, 2)
    extensions += extra_extensions
    return (
        legacy_version.to_bytes(2, "big")
        + bytes(range(32))
        + _vector(bytes(range(32)), 1)
        + _vector(bytes.fromhex("130113021303c02f"), 2)
        + _vector(b"\x00", 1)
        + _vector(extensions, 2)
    )


def records(body: bytes, fragment: int = 16384, msg_type: int = 1) -> bytes:
    """Wrap a handshake body in a handshake header and TLS records of at most ``fragment`` bytes."""
    message = bytes([msg_type]) + len(body).to_bytes(3, "big") + body
    out = b""
    for i in range(0, len(message), fragment):
        piece = message[i : i + fragment]
        out += b"\x16\x03\x01" + len(piece).to_bytes(2, "big") + piece
    return out


def h2_request(headers: list[tuple[str, str]], *, settle: bool = False) -> bytes:
    """What the ``h2`` library sends as a prior-knowledge client making one request."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    data = conn.data_to_send()
    if settle:
        # An ACK of the server's SETTINGS before the request, as a waiting client sends it.
        data += b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"
    conn.send_headers(1, headers, end_stream=True)
    return data + conn.data_to_send()


GRPC_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/muxtwist.test.Echo/Say"),
    (":authority", "127.0.0.1"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]
GET_HEADERS = [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")]

WEBSOCKET = (
    b"GET /chat HTTP/1.1\r\nHost: www.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
_PG_PARAMETERS = b"user\x00alice\x00database\x00shop\x00\x00"
PG_STARTUP = (8 + len(_PG_PARAMETERS)).to_bytes(4, "big") + b"\x00\x03\x00\x00" + _PG_PARAMETERS
MQTT_CONNECT = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04abcd"


def seeds() -> dict[str, list[bytes]]:
    """Valid first messages, by matcher name."""
    tls = [ssl_client_hello(), ssl_client_hello(None, ["h2"]), records(client_hello_body(sni="a.test"), 100)]
    return {
        "tls": tls,
        "http2": [h2_request(GET_HEADERS)],
        "http2_header": [h2_request(GET_HEADERS), h2_request(GET_HEADERS, settle=True)],
        "grpc": [h2_request(GRPC_HEADERS), h2_request(GRPC_HEADERS, settle=True)],
        "websocket": [WEBSOCKET],
        "ssh": [b"SSH-2.0-OpenSSH_9.6 Ubuntu\r\n", b"SSH-1.99-Cisco-1.25\r\n"],
        "redis": [
            b"*1\r\n$4\r\nPING\r\n",
            b"*2\r\n$4\r\nAUTH\r\n$6\r\nsecret\r\n",
            b"PING\r\n",
            b"AUTH x\r\n",
            b"HELLO 3 AUTH default secret\r\n",
            b'echo "hello world"\n',
        ],
        "postgresql": [PG_STARTUP, b"\x00\x00\x00\x08\x04\xd2\x16\x2f", b"\x00\x00\x00\x10\x04\xd2\x16\x2e" + bytes(8)],
        "mqtt": [
            MQTT_CONNECT,
            b"\x10\x12\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x04abcd",
            MQTT_CONNECT.replace(b"\x04\x02", b"\x84\x02"),
        ],
        "socks4": [b"\x04\x01\x00\x50\x7f\x00\x00\x01bob\x00", b"\x04\x01\x00\x50\x00\x00\x00\x01\x00a.example\x00"],
        "socks5": [b"\x05\x02\x00\x02", b"\x05\x01\x00"],
        "openvpn": [
            openvpn_hard_reset(),
            openvpn_hard_reset(32),
            openvpn_hard_reset(16, tlv=False),
            openvpn_hard_reset(64, opcode=1),
            openvpn_tls_crypt_reset(),
            openvpn_tls_crypt_reset(v2_key=True),
        ],
        "xmpp": [xmpp_stream_header(), b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>"],
        "rdp": [rdp_connection_request(), rdp_connection_request(correlation=True)],
    }


@st.composite
def mutated(draw: st.DrawFn, samples: list[bytes]) -> bytes:
    """A sample with a few random edits: truncation, byte changes, insertions, deletions; or random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    data = bytearray(draw(st.sampled_from(samples)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["trunc", "set", "insert", "delete"]))
        at = draw(st.integers(0, len(data)))
        if op == "trunc":
            del data[at:]
        elif op == "set" and at < len(data):
            data[at] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


def verdicts_over_prefixes(matcher: IMatcher, data: bytes) -> list[Verdict]:
    """The matcher's verdict for every prefix of ``data``, the empty one included."""
    return [matcher.match(data[:i], INFO) for i in range(len(data) + 1)]


def monotonic_failure(matcher: IMatcher, data: bytes) -> str | None:
    """``None`` if the verdicts over the prefixes of ``data`` never change once decided, else what went wrong."""
    decided: tuple[int, Verdict] | None = None
    for i, v in enumerate(verdicts_over_prefixes(matcher, data)):
        if decided is None:
            if v is not Verdict.NEED_MORE:
                decided = (i, v)
        elif v is not decided[1]:
            return f"{matcher.name}: {decided[1].name} at {decided[0]} bytes but {v.name} at {i}: {data[:i]!r}"
    return None
