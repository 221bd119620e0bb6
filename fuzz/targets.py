"""
The fuzz targets: one per parser, each a function of arbitrary bytes that
must never raise (but for the documented error of a parser that has one)
and must keep the matcher contract (a verdict; decided verdicts are final:
a longer prefix of the stream keeps them).

Shared by the atheris harnesses (``fuzz/fuzz_<name>.py``, run by
``fuzz/run.py``) and by the hypothesis run in ``tests/test_fuzz_harnesses.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from muxtwist.interfaces import ConnectionInfo

__all__ = ["SEEDS", "TARGETS", "check_matchers"]


def check_matchers(matchers: Sequence[object], data: bytes) -> None:
    """Every matcher gives a verdict on ``data``, and a decided verdict on a prefix of it stands."""
    from muxtwist.interfaces import ConnectionInfo, Verdict

    info = ConnectionInfo()
    cut = len(data) // 2
    for m in matchers:
        full = m.match(data, info)  # type: ignore[attr-defined]
        assert isinstance(full, Verdict), (m, full)
        half = m.match(data[:cut], info)  # type: ignore[attr-defined]
        if half is not Verdict.NEED_MORE:
            assert full is half, f"{m!r}: {half} on the first {cut} bytes, {full} on all {len(data)}"


def tls(data: bytes) -> None:
    from muxtwist.interfaces import Verdict
    from muxtwist.matchers.tls import TLS, parse_client_hello

    verdict, hello = parse_client_hello(data)
    assert (verdict is Verdict.MATCH) == (hello is not None), (verdict, hello)
    check_matchers([TLS(), TLS(sni="*.example.com", alpn="h2", min_version="TLSv1.3")], data)


def http_head(data: bytes) -> None:
    from muxtwist.interfaces import Verdict
    from muxtwist.matchers.http import HTTP1, parse_request_head

    verdict, head = parse_request_head(data)
    if head is not None:
        assert verdict is Verdict.MATCH
        host, path = head.host, head.path
        # A host is a plain name or address: nothing a server could read as another host or a path.
        assert host is None or (host and not set(host) & set("/@?#, \t\\")), host
        if host is not None and len(head.header_values(b"host")) > 1:
            raise AssertionError(f"duplicate Host headers gave host {host!r}")
        assert path is None or not path.startswith("/") or ("/../" not in path + "/" and "//" not in path), path
    check_matchers([HTTP1(), HTTP1(host="*.example.com", path="/api/*", headers={"upgrade": None})], data)


def redirect(data: bytes) -> None:
    """RedirectToHTTPS's Location: https, the Host's name, then a path starting with '/' or nothing at all."""
    import re

    from muxtwist.redirect import location

    host, _, uri = data.partition(b"\n")
    port = int.from_bytes(uri[:2], "big") or None if uri[:1] == b"\x00" else None
    out = location(host, port, uri)
    if out is not None:
        found = re.match(rb"https://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*)(:[0-9]+)?(/.*)?\Z", out, re.S)
        assert found is not None and found.group(3) is not None, out


def http2(data: bytes) -> None:
    from muxtwist.matchers.http2 import GRPC, HTTP2, HTTP2Header, first_headers

    first_headers(data)
    grpc = GRPC()
    grpc.respond(data, _info())
    grpc.filter_replay(data)
    check_matchers([HTTP2(), grpc, HTTP2Header(":authority", prefix="api.")], data)


def http2_after_preface(data: bytes) -> None:
    """The same, with the preface given, so the fuzzer spends its time on frames and HPACK."""
    from muxtwist.matchers.http2 import PREFACE

    http2(PREFACE + data)


def proxy_protocol(data: bytes) -> None:
    from twisted.internet.address import IPv4Address

    from muxtwist.interfaces import ConnectionInfo
    from muxtwist.matchers._basic import parse_networks
    from muxtwist.matchers.proxy_protocol import ProxyProtocol, ProxyProtocolError, parse, signature
    from muxtwist.proxyprotocol import ProxyHeaderReader

    signature(data)
    try:
        header = parse(data)
    except ProxyProtocolError:
        header = None
    if header is not None:
        assert 0 < header.length <= len(data)
    check_matchers([ProxyProtocol()], data)
    peer = IPv4Address("TCP", "10.0.0.1", 1234)
    for trusted in ("10.0.0.0/8", "192.0.2.0/24"):
        reader = ProxyHeaderReader(ConnectionInfo(peer=peer), parse_networks([trusted]))
        try:
            for i in range(0, len(data), 7):
                if reader.feed(data[i : i + 7]) is not None:
                    break
        except ValueError:
            pass


def redis(data: bytes) -> None:
    from muxtwist.matchers.redis import Redis

    check_matchers([Redis()], data)


def postgresql(data: bytes) -> None:
    from muxtwist.matchers.postgresql import PostgreSQL

    check_matchers([PostgreSQL()], data)


def mqtt(data: bytes) -> None:
    from muxtwist.matchers.mqtt import MQTT

    check_matchers([MQTT()], data)


def socks(data: bytes) -> None:
    from muxtwist.matchers.socks import SOCKS4, SOCKS5

    check_matchers([SOCKS4(), SOCKS5()], data)


def others(data: bytes) -> None:
    """The smaller parsers: SSH identification, XMPP stream header, WebSocket, RDP, OpenVPN."""
    from muxtwist.matchers import RDP, SSH, XMPP, OpenVPN, WebSocket
    from muxtwist.matchers.ssh import parse_identification
    from muxtwist.matchers.xmpp import parse_stream_header

    parse_identification(data)
    parse_stream_header(data)
    check_matchers([SSH(), XMPP(), WebSocket(), RDP(), OpenVPN()], data)


def _info() -> ConnectionInfo:
    from muxtwist.interfaces import ConnectionInfo

    return ConnectionInfo()


#: harness name -> target.
TARGETS: dict[str, Callable[[bytes], None]] = {
    "tls": tls,
    "http_head": http_head,
    "http2": http2_after_preface,
    "proxy_protocol": proxy_protocol,
    "redis": redis,
    "postgresql": postgresql,
    "mqtt": mqtt,
    "socks": socks,
    "others": others,
    "redirect": redirect,
}


#: capture protocol (tests/captures.py) -> harness.
_CAPTURE_HARNESS = {
    "tls": "tls",
    "http1": "http_head",
    "websocket": "http_head",
    "http2": "http2",
    "grpc": "http2",
    "redis": "redis",
    "postgresql": "postgresql",
    "mqtt": "mqtt",
    "socks4": "socks",
    "socks5": "socks",
    "ssh": "others",
    "xmpp": "others",
    "rdp": "others",
    "openvpn": "others",
}

#: Ordinary text and other protocols' openers, given to every harness: the
#: negative cases peer projects test matchers with.
_TEXT = [b"hello world\r\n", b"Hello World\n", b"HELLO 3\r\n", b"PING\r\n", b"\r\n", b"\x05\x01\x00"]


def _capture_seeds() -> dict[str, list[bytes]]:
    """The real clients' first bytes from tests/captures.py, by harness (empty if they cannot be taken)."""
    try:
        from muxtwist.matchers.http2 import PREFACE
        from tests.captures import all_captures

        captures = all_captures()
    except Exception:
        return {}
    out: dict[str, list[bytes]] = {}
    for c in captures:
        harness = _CAPTURE_HARNESS.get(c.protocol)
        if harness is None or not c.data:
            continue
        data = c.data.removeprefix(PREFACE) if harness == "http2" else c.data
        out.setdefault(harness, []).append(data)
    return out


def _seeds(real_captures: bool = False) -> dict[str, list[bytes]]:
    """
    Seed inputs per harness: built openers, text, and with ``real_captures``
    the bytes real clients send (tests/captures.py runs them, so this takes
    a few seconds and needs the clients installed).
    """
    from muxtwist.matchers.proxy_protocol import build_v1, build_v2

    try:
        from tests.reliability.openers import OPENERS
    except ImportError:
        OPENERS = {}
    src, dst = ("192.0.2.1", 1), ("192.0.2.2", 2)
    http2_frames = bytes.fromhex("000000040000000000") + bytes.fromhex(
        "00001d0105000000018286418aa0e41d139d09b8f01e07847a8825b650c3abb6f2e053"
    )
    seeds: dict[str, list[bytes]] = {
        "tls": [OPENERS.get("tls", b"\x16\x03\x01")],
        "http_head": [OPENERS.get("http1", b"GET / HTTP/1.1\r\n\r\n"), OPENERS.get("websocket", b"")],
        "http2": [http2_frames],
        "proxy_protocol": [build_v1(src, dst), build_v2(src, dst), b"PROXY UNKNOWN\r\n"],
        "redis": [OPENERS.get("redis", b"*1\r\n"), b"PING\r\n"],
        "postgresql": [OPENERS.get("postgresql", b"\x00\x00\x00\x08\x04\xd2\x16\x2f")],
        "mqtt": [OPENERS.get("mqtt", b"\x10")],
        "socks": [b"\x05\x01\x00", b"\x04\x01\x00\x50\x7f\x00\x00\x01alice\x00"],
        "others": [OPENERS.get("ssh", b"SSH-2.0-x\r\n"), b"<?xml version='1.0'?><stream:stream to='a'>"],
        "redirect": [
            b"a.test\n/x?y=1",
            b"a.test:80\n\x00\x00http://evil.example/p",
            b"[::1]:8080\n@evil.example/x",
            b"a.test\n\x20\xfb//evil.example",
        ],
    }
    captured = _capture_seeds() if real_captures else {}
    for name, inputs in seeds.items():
        inputs.extend(captured.get(name, []))
        if name != "redirect":
            inputs.extend(_TEXT)
    return seeds


#: harness name -> seed inputs (real openers where there are some).
SEEDS: Callable[..., dict[str, list[bytes]]] = _seeds
