"""
The protocol matchers, case by case: what each one accepts, its options, and
the malformed inputs (truncated, huge or zero lengths) it must refuse.
"""

from __future__ import annotations

from twisted.trial import unittest

from muxtwist.interfaces import IMatcher, IRespondingMatcher, Verdict
from muxtwist.matchers import (
    GRPC,
    HTTP2,
    MQTT,
    RDP,
    SOCKS4,
    SOCKS5,
    SSH,
    TLS,
    XMPP,
    HTTP2Header,
    OpenVPN,
    PostgreSQL,
    Redis,
    WebSocket,
    parse_client_hello,
    plugin,
)
from muxtwist.matchers.http2 import PREFACE, SETTINGS_FRAME, first_headers
from muxtwist.matchers.ssh import parse_identification
from muxtwist.matchers.tls import MAX_CLIENT_HELLO, MAX_RECORDS
from tests.captures import openvpn_hard_reset, rdp_connection_request, xmpp_stream_header
from tests.matcher_checks import (
    GET_HEADERS,
    GRPC_HEADERS,
    INFO,
    MQTT_CONNECT,
    PG_STARTUP,
    WEBSOCKET,
    client_hello_body,
    h2_request,
    monotonic_failure,
    records,
    ssl_client_hello,
)

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE


class _Case(unittest.TestCase):
    def assertVerdict(self, matcher: IMatcher, data: bytes, verdict: Verdict) -> None:
        self.assertIs(matcher.match(data, INFO), verdict, data[:80])


class TLSTests(_Case):
    """The ClientHello parser and the TLS matcher."""

    def test_parses_python_ssl_hello(self) -> None:
        """A real ClientHello from the ssl module gives its SNI, ALPN list and versions."""
        verdict, hello = parse_client_hello(ssl_client_hello("API.Example.com", ["h2", "http/1.1"]))
        self.assertIs(verdict, MATCH)
        assert hello is not None
        self.assertEqual(hello.sni, "api.example.com")
        self.assertEqual(hello.alpn, ("h2", "http/1.1"))
        self.assertIn(0x0304, hello.versions)
        self.assertEqual(hello.max_version, 0x0304)

    def test_reassembles_across_records(self) -> None:
        """A ClientHello split over many small records parses like a whole one."""
        body = client_hello_body(sni="a.example.com", alpn=(b"h2",))
        for size in (2, 3, 4, 5, 7, 64, 1000):
            verdict, hello = parse_client_hello(records(body, size))
            self.assertIs(verdict, MATCH, size)
            assert hello is not None
            self.assertEqual((hello.sni, hello.alpn), ("a.example.com", ("h2",)))

    def test_record_count_bounded(self) -> None:
        """A hello spread over more than MAX_RECORDS records is NO_MATCH, decided at the record past the cap."""
        body = client_hello_body(sni="a.example.com", padding=200)
        data = records(body, 1)
        self.assertVerdict(TLS(), data, NO_MATCH)
        self.assertVerdict(TLS(), data[: 6 * MAX_RECORDS], NEED_MORE)
        self.assertVerdict(TLS(), data[: 6 * MAX_RECORDS + 1], NO_MATCH)
        self.assertIsNone(monotonic_failure(TLS(), data))

    def test_hello_larger_than_a_record(self) -> None:
        """A 20 KiB ClientHello (large post-quantum key shares) spans two records and still matches by SNI."""
        body = client_hello_body(sni="pq.example.com", versions=(0x0304,), padding=20000)
        data = records(body)
        self.assertGreater(len(data), 16384 + 5)
        self.assertVerdict(TLS(sni="pq.example.com"), data, MATCH)
        self.assertVerdict(TLS(sni="pq.example.com"), data[:-1], NEED_MORE)
        self.assertVerdict(TLS(sni="other.example.com"), data, NO_MATCH)

    def test_options(self) -> None:
        """sni takes names, globs and lists case-insensitively; alpn any of; min_version from supported_versions."""
        data = records(client_hello_body(sni="www.Example.com", alpn=(b"http/1.1",), versions=(0x0A0A, 0x0304)))
        self.assertVerdict(TLS(sni="www.example.com"), data, MATCH)
        self.assertVerdict(TLS(sni="*.EXAMPLE.com"), data, MATCH)
        self.assertVerdict(TLS(sni=["a.test", "*.example.com"]), data, MATCH)
        self.assertVerdict(TLS(sni="example.com"), data, NO_MATCH)
        self.assertVerdict(TLS(alpn=["h2", "http/1.1"]), data, MATCH)
        self.assertVerdict(TLS(alpn="h2"), data, NO_MATCH)
        self.assertVerdict(TLS(min_version="TLSv1.3"), data, MATCH)
        old = records(client_hello_body(sni="x.test", legacy_version=0x0303))
        self.assertVerdict(TLS(min_version="TLSv1.3"), old, NO_MATCH)
        self.assertVerdict(TLS(min_version="TLSv1.2"), old, MATCH)
        self.assertVerdict(TLS(sni="x.test"), records(client_hello_body()), NO_MATCH)
        self.assertRaises(ValueError, TLS, min_version="TLSv9")

    def test_malformed(self) -> None:
        """SSLv2 hellos, bad content types, zero, huge and truncated lengths, duplicate extensions: NO_MATCH."""
        good = records(client_hello_body(sni="a.test"))
        cases = {
            "sslv2": bytes.fromhex("80 2e 01 00 02 00 15 00 00 00 10".replace(" ", "")) + bytes(37),
            "alert": b"\x15\x03\x01\x00\x02\x02\x28",
            "record version": b"\x16\x02\x00" + good[3:],
            "zero record": b"\x16\x03\x01\x00\x00" + good[5:],
            "huge record": b"\x16\x03\x01\x40\x01" + good[5:],
            "server hello": records(client_hello_body(), msg_type=2),
            "huge hello": b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",
            "tiny hello": b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00",
            "zero hello": b"\x16\x03\x01\x00\x04\x01\x00\x00\x00",
            "body version": records(client_hello_body(legacy_version=0x0200)),
            "extensions overrun": records(client_hello_body()[:-2] + b"\x00\x01\x00\xff"),
            "duplicate sni": records(client_hello_body(sni="a.test", extra_extensions=b"\x00\x00\x00\x00")),
            "empty alpn": records(client_hello_body(extra_extensions=b"\x00\x10\x00\x02\x00\x00")),
            "record not handshake": records(client_hello_body(sni="a.test"), 50)[:55] + b"\x17\x03\x03\x00\x10",
        }
        for label, data in cases.items():
            self.assertVerdict(TLS(), data, NO_MATCH)
            self.assertIsNone(monotonic_failure(TLS(), data), label)
        self.assertGreater(MAX_CLIENT_HELLO, 16384)

    def test_need_more_while_truncated(self) -> None:
        """Every proper prefix of a valid hello is NEED_MORE."""
        data = records(client_hello_body(sni="a.test"), 40)
        for i in range(len(data)):
            self.assertVerdict(TLS(), data[:i], NEED_MORE)


class HTTP2Tests(_Case):
    """HTTP2, HTTP2Header and GRPC."""

    def test_preface(self) -> None:
        """HTTP2 decides on the 24-byte preface."""
        self.assertVerdict(HTTP2(), PREFACE[:10], NEED_MORE)
        self.assertVerdict(HTTP2(), PREFACE, MATCH)
        self.assertVerdict(HTTP2(), b"PRI * HTTP/1.1\r\n", NO_MATCH)
        self.assertVerdict(HTTP2(), b"GET / HTTP/1.1\r\n", NO_MATCH)

    def test_headers_decoded(self) -> None:
        """first_headers decodes the h2 library's HEADERS, pseudo-headers included."""
        verdict, headers = first_headers(h2_request(GRPC_HEADERS))
        self.assertIs(verdict, MATCH)
        assert headers is not None
        self.assertIn((":path", "/muxtwist.test.Echo/Say"), headers)
        self.assertIn(("content-type", "application/grpc"), headers)

    def test_grpc(self) -> None:
        """GRPC matches application/grpc requests and refuses others."""
        self.assertVerdict(GRPC(), h2_request(GRPC_HEADERS), MATCH)
        proto = [(k, "application/grpc+proto" if k == "content-type" else v) for k, v in GRPC_HEADERS]
        self.assertVerdict(GRPC(), h2_request(proto), MATCH)
        self.assertVerdict(GRPC(), h2_request(GET_HEADERS), NO_MATCH)

    def test_header_options(self) -> None:
        """HTTP2Header compares a header by presence, exact value or prefix."""
        data = h2_request(GRPC_HEADERS)
        self.assertVerdict(HTTP2Header("TE"), data, MATCH)
        self.assertVerdict(HTTP2Header(":path", value="/muxtwist.test.Echo/Say"), data, MATCH)
        self.assertVerdict(HTTP2Header(":path", prefix="/muxtwist.test."), data, MATCH)
        self.assertVerdict(HTTP2Header(":path", prefix="/other."), data, NO_MATCH)
        self.assertVerdict(HTTP2Header("x-missing"), data, NO_MATCH)

    def test_continuation(self) -> None:
        """A header block split into HEADERS and CONTINUATION frames is reassembled."""
        data = h2_request(GRPC_HEADERS)
        start = data.index(b"\x01\x05\x00\x00\x00\x01") - 3
        length = int.from_bytes(data[start : start + 3], "big")
        block = data[start + 9 : start + 9 + length]
        split = (
            (5).to_bytes(3, "big") + b"\x01\x01\x00\x00\x00\x01" + block[:5]
            + (length - 5).to_bytes(3, "big") + b"\x09\x04\x00\x00\x00\x01" + block[5:]
        )  # fmt: skip
        self.assertVerdict(GRPC(), data[:start] + split, MATCH)
        self.assertVerdict(GRPC(), data[:start] + split[: 9 + 5], NEED_MORE)

    def test_malformed(self) -> None:
        """No SETTINGS first, huge frames, DATA before HEADERS, bad padding, bad HPACK: NO_MATCH."""
        settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        cases = [
            PREFACE + b"\x00\x00\x00\x06\x00\x00\x00\x00\x00",
            PREFACE + b"\x00\x40\x01\x04\x00\x00\x00\x00\x00",
            PREFACE + settings + b"\x00\x00\x01\x00\x00\x00\x00\x00\x01x",
            PREFACE + settings + b"\x00\x00\x02\x01\x0c\x00\x00\x00\x01\x05\x82",
            PREFACE + settings + b"\x00\x00\x01\x01\x04\x00\x00\x00\x02\x82",
            PREFACE + settings + b"\x00\x00\x02\x01\x04\x00\x00\x00\x01\xff\xff",
            PREFACE + settings + b"\x00\x00\x01\x09\x04\x00\x00\x00\x01\x82",
            PREFACE + b"\xff\xff\xff\x04\x00\x00\x00\x00\x00",
        ]
        for data in cases:
            self.assertVerdict(GRPC(), data, NO_MATCH)
            self.assertIsNone(monotonic_failure(GRPC(), data))

    def test_responds_with_settings_once_waiting(self) -> None:
        """Once preface and SETTINGS are in without HEADERS, GRPC declares an empty SETTINGS frame."""
        waiting = h2_request(GRPC_HEADERS)
        waiting = waiting[: waiting.index(b"\x01\x05\x00\x00\x00\x01") - 3]
        for m in (GRPC(), HTTP2Header("te")):
            self.assertTrue(IRespondingMatcher.providedBy(m))
            self.assertEqual(m.respond(PREFACE, INFO), b"")
            self.assertEqual(m.respond(waiting, INFO), SETTINGS_FRAME)
            self.assertEqual(m.respond(h2_request(GRPC_HEADERS), INFO), b"")

    def test_filter_replay_removes_first_ack(self) -> None:
        """filter_replay drops exactly the first SETTINGS ACK after the preface and nothing else."""
        settled = h2_request(GRPC_HEADERS, settle=True)
        plain = h2_request(GRPC_HEADERS)
        self.assertEqual(GRPC().filter_replay(settled), plain)
        self.assertEqual(GRPC().filter_replay(plain), plain)
        ack = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"
        self.assertEqual(GRPC().filter_replay(settled + ack), plain + ack)
        self.assertEqual(GRPC().filter_replay(b"GET /"), b"GET /")


class OtherProtocolTests(_Case):
    """WebSocket, SSH, Redis, PostgreSQL, MQTT, SOCKS, OpenVPN, XMPP and RDP."""

    def test_websocket(self) -> None:
        """An Upgrade: websocket GET matches, with a path glob; plain GETs and POSTs do not."""
        self.assertVerdict(WebSocket(), WEBSOCKET, MATCH)
        self.assertVerdict(WebSocket(path="/chat"), WEBSOCKET, MATCH)
        self.assertVerdict(WebSocket(path="/api/*"), WEBSOCKET, NO_MATCH)
        self.assertVerdict(WebSocket(), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", NO_MATCH)
        self.assertVerdict(WebSocket(), b"POST /chat HTTP/1.1\r\n", NO_MATCH)
        self.assertVerdict(WebSocket(), WEBSOCKET.replace(b"HTTP/1.1", b"HTTP/1.0"), NO_MATCH)
        self.assertVerdict(WebSocket(), WEBSOCKET[:-2], NEED_MORE)

    def test_ssh(self) -> None:
        """SSH-2.0 and SSH-1.99 lines match from their prefix on; SSH-1.5 does not."""
        self.assertVerdict(SSH(), b"SSH-2.0-OpenSSH_9.6\r\n", MATCH)
        self.assertVerdict(SSH(), b"SSH-1.99-x\n", MATCH)
        self.assertVerdict(SSH(), b"SSH-2.0-OpenSSH_9.6\r", MATCH)
        self.assertVerdict(SSH(), b"SSH-1.5-old\r\n", NO_MATCH)
        self.assertVerdict(SSH(), b"SSH-2", NEED_MORE)

    def test_ssh_identification_line(self) -> None:
        """parse_identification reads the software version; empty software and control bytes are NO_MATCH."""
        self.assertEqual(parse_identification(b"SSH-2.0-OpenSSH_9.6 Ubuntu\r\n"), (MATCH, "OpenSSH_9.6 Ubuntu"))
        self.assertEqual(parse_identification(b"SSH-2.0-OpenSSH_9.6\r"), (NEED_MORE, None))
        self.assertEqual(parse_identification(b"SSH-2.0-\r\n"), (NO_MATCH, None))
        self.assertEqual(parse_identification(b"SSH-2.0-a\x00b\r\n"), (NO_MATCH, None))
        self.assertEqual(parse_identification(b"SSH-2.0-" + b"a" * 300), (NO_MATCH, None))

    def test_redis(self) -> None:
        """RESP arrays and inline commands match; zero, huge or non-numeric lengths and GET do not."""
        self.assertVerdict(Redis(), b"*3\r\n$3\r\nSET\r\n", MATCH)
        self.assertVerdict(Redis(), b"hello 3\r\n", MATCH)
        self.assertVerdict(Redis(), b"*1\r\n$4\r\nPI", NEED_MORE)
        for bad in (b"*0\r\n", b"*-1\r\n", b"*99999999\r\n", b"*1\r\n$0\r\n", b"*1\r\n$999\r\n", b"*1\r\n+OK\r\n"):
            self.assertVerdict(Redis(), bad, NO_MATCH)
        self.assertVerdict(Redis(), b"*1\r\n$4\r\n1234\r\n", NO_MATCH)
        self.assertVerdict(Redis(), b"GET / HTTP/1.1\r\n", NO_MATCH)

    def test_postgresql(self) -> None:
        """Startup, SSL, GSS and cancel requests match; bad codes and lengths and missing user do not."""
        self.assertVerdict(PostgreSQL(), PG_STARTUP, MATCH)
        self.assertVerdict(PostgreSQL(), PG_STARTUP[:-1], NEED_MORE)
        self.assertVerdict(PostgreSQL(), b"\x00\x00\x00\x08\x04\xd2\x16\x30", MATCH)
        self.assertVerdict(PostgreSQL(), b"\x00\x00\x00\x10\x04\xd2\x16\x2e", MATCH)
        self.assertVerdict(PostgreSQL(), b"\x00\x00\x00\x09\x04\xd2\x16\x2f", NO_MATCH)
        self.assertVerdict(PostgreSQL(), b"\x00\x00\x00\x00", NO_MATCH)
        self.assertVerdict(PostgreSQL(), b"\x00\x00\xff\xff", NO_MATCH)
        self.assertVerdict(PostgreSQL(), b"\x00\x00\x00\x0a\x00\x02\x00\x00", NO_MATCH)
        no_user = b"database\x00shop\x00\x00"
        self.assertVerdict(
            PostgreSQL(), (8 + len(no_user)).to_bytes(4, "big") + b"\x00\x03\x00\x00" + no_user, NO_MATCH
        )

    def test_mqtt(self) -> None:
        """CONNECT levels 3, 4 and 5 match; other packets, levels, reserved flags and long lengths do not."""
        self.assertVerdict(MQTT(), MQTT_CONNECT, MATCH)
        self.assertVerdict(MQTT(), MQTT_CONNECT[:9], NEED_MORE)
        self.assertVerdict(MQTT(), MQTT_CONNECT.replace(b"\x04\x02", b"\x05\x02"), MATCH)
        self.assertVerdict(MQTT(), MQTT_CONNECT.replace(b"\x04\x02", b"\x06\x02"), NO_MATCH)
        self.assertVerdict(MQTT(), MQTT_CONNECT.replace(b"\x04\x02", b"\x04\x03"), NO_MATCH)
        self.assertVerdict(MQTT(), b"\x20\x02\x00\x00", NO_MATCH)
        self.assertVerdict(MQTT(), b"\x10\xff\xff\xff\xff\x01", NO_MATCH)
        self.assertVerdict(MQTT(), b"\x10\x02\x00\x04MQTT\x04\x02", NO_MATCH)

    def test_socks(self) -> None:
        """SOCKS4, 4a and 5 requests match; bad versions, commands, addresses and methods do not."""
        self.assertVerdict(SOCKS4(), b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", MATCH)
        self.assertVerdict(SOCKS4(), b"\x04\x01\x00\x50\x00\x00\x00\x01\x00a.test\x00", MATCH)
        self.assertVerdict(SOCKS4(allow_4a=False), b"\x04\x01\x00\x50\x00\x00\x00\x01\x00a.test\x00", NO_MATCH)
        self.assertVerdict(SOCKS4(), b"\x04\x01\x00\x50\x00\x00\x00\x01\x00a.test", NEED_MORE)
        self.assertVerdict(SOCKS4(), b"\x04\x03", NO_MATCH)
        self.assertVerdict(SOCKS4(), b"\x04\x01\x00\x50\x00\x00\x00\x00\x00", NO_MATCH)
        self.assertVerdict(SOCKS4(), b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 300, NO_MATCH)
        self.assertVerdict(SOCKS4(), b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\x00", NO_MATCH)
        self.assertVerdict(SOCKS5(), b"\x05\x01\x00", MATCH)
        self.assertVerdict(SOCKS5(), b"\x05\x02\x00", NEED_MORE)
        self.assertVerdict(SOCKS5(), b"\x05\x00", NO_MATCH)
        self.assertVerdict(SOCKS5(), b"\x05\x01\xff", NO_MATCH)

    def test_openvpn(self) -> None:
        """Hard resets, plain and tls-auth, match; other opcodes, key ids, lengths and zero sessions do not."""
        plain = openvpn_hard_reset()
        self.assertVerdict(OpenVPN(), plain, MATCH)
        self.assertVerdict(OpenVPN(), openvpn_hard_reset(20), MATCH)
        self.assertVerdict(OpenVPN(), plain[:-1], NEED_MORE)
        self.assertVerdict(OpenVPN(), plain[:2] + bytes([4 << 3]) + plain[3:], NO_MATCH)
        self.assertVerdict(OpenVPN(), plain[:2] + bytes([(7 << 3) | 1]) + plain[3:], NO_MATCH)
        self.assertVerdict(OpenVPN(), b"\x00\x00", NO_MATCH)
        self.assertVerdict(OpenVPN(), b"\xff\xff", NO_MATCH)
        self.assertVerdict(OpenVPN(), plain[:3] + bytes(8) + plain[11:], NO_MATCH)

    def test_xmpp(self) -> None:
        """Stream headers match, with or without declaration and by ``to``; other XML does not."""
        self.assertVerdict(XMPP(), xmpp_stream_header(), MATCH)
        self.assertVerdict(XMPP(to="chat.example.com"), xmpp_stream_header(), MATCH)
        self.assertVerdict(XMPP(to="other.test"), xmpp_stream_header(), NO_MATCH)
        self.assertVerdict(XMPP(), xmpp_stream_header()[:-1], NEED_MORE)
        self.assertVerdict(XMPP(), b"<html><body>", NO_MATCH)
        self.assertVerdict(XMPP(), b"<stream:stream xmlns:stream='urn:other'>", NO_MATCH)
        self.assertVerdict(XMPP(), b"<stream:stream a='<'>", NO_MATCH)
        self.assertVerdict(XMPP(), b"<?xml version='1.0'?>" + b" " * 5000, NO_MATCH)

    def test_rdp(self) -> None:
        """X.224 connection requests match; bad TPKT versions, lengths and TPDU codes do not."""
        data = rdp_connection_request()
        self.assertVerdict(RDP(), data, MATCH)
        self.assertVerdict(RDP(), data[:-1], NEED_MORE)
        self.assertVerdict(RDP(), b"\x03\x00\x00\x0b\x06\xe0\x00\x00\x00\x00\x00", MATCH)
        self.assertVerdict(RDP(), b"\x03\x00\x00\x05", NO_MATCH)
        self.assertVerdict(RDP(), b"\x03\x00\xff\xff", NO_MATCH)
        self.assertVerdict(RDP(), b"\x03\x00\x00\x0b\x06\xd0", NO_MATCH)
        self.assertVerdict(RDP(), b"\x03\x00\x00\x0b\x07\xe0", NO_MATCH)


class PluginTests(unittest.TestCase):
    """The plugin registrations."""

    def test_every_matcher_by_name(self) -> None:
        """Every protocol matcher is built by its lower-case plugin name, with options."""
        expected = {
            "tls": TLS,
            "http2": HTTP2,
            "grpc": GRPC,
            "websocket": WebSocket,
            "ssh": SSH,
            "redis": Redis,
            "postgresql": PostgreSQL,
            "mqtt": MQTT,
            "socks4": SOCKS4,
            "socks5": SOCKS5,
            "openvpn": OpenVPN,
            "xmpp": XMPP,
            "rdp": RDP,
        }
        for name, cls in expected.items():
            self.assertIsInstance(plugin(name), cls)
        self.assertEqual(plugin("tls", sni="*.example.com").sni, ("*.example.com",))  # type: ignore[attr-defined]
        self.assertIsInstance(plugin("http2_header", header="te", value="trailers"), HTTP2Header)
