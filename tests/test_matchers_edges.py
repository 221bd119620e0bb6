"""
The matchers at the edges of their specifications: ordinary text and other
protocols' openers that no matcher may claim (the negative cases peer
projects such as sslh, cmux and caddy-l4 test with), valid variants every
matcher must take, and openers that are conclusive before their end.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess

from twisted.trial import unittest

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
    HTTP2Header,
    OpenVPN,
    PostgreSQL,
    ProxyProtocol,
    Redis,
    WebSocket,
)
from muxtwist.matchers.openvpn import HMAC_SIZES
from muxtwist.matchers.proxy_protocol import build_v1, build_v2
from tests.captures import (
    openvpn_hard_reset,
    openvpn_tls_crypt_reset,
    rdp_connection_request,
)
from tests.certs import make_certificate
from tests.matcher_checks import INFO, monotonic_failure, seeds

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

#: Every protocol matcher with its default options, and a few with options.
PROTOCOL_MATCHERS: tuple[IMatcher, ...] = (
    HTTP1(),
    HTTP1(host="a.test"),
    HTTP2(),
    HTTP2Header(":authority"),
    GRPC(),
    WebSocket(),
    TLS(),
    SSH(),
    Redis(),
    PostgreSQL(),
    MQTT(),
    SOCKS4(),
    SOCKS5(),
    OpenVPN(),
    XMPP(),
    RDP(),
    ProxyProtocol(),
    ProxyProtocol(version=1),
    ProxyProtocol(version=2),
)

_SRC, _DST = ("192.0.2.1", 51000), ("192.0.2.2", 443)

#: label -> (bytes, the matcher names allowed to claim them). The text cases
#: are the "hello world" probes of sslh's and cmux's tests and what people
#: type into a raw connection; the binary ones are other protocols' openers.
NEGATIVES: dict[str, tuple[bytes, frozenset[str]]] = {
    "hello world crlf": (b"hello world\r\n", frozenset()),
    "hello world lf": (b"hello world\n", frozenset()),
    "hello world bare": (b"hello world", frozenset()),
    "Hello World crlf": (b"Hello World\r\n", frozenset()),
    "HELLO WORLD crlf": (b"HELLO WORLD\r\n", frozenset()),
    "Hello, World!": (b"Hello, World!\r\n", frozenset()),
    "hello there, how are you": (b"hello there, how are you?\r\n", frozenset()),
    "Hello": (b"Hello\r\n", frozenset()),
    "Info please": (b"Info please\r\n", frozenset()),
    "quit now": (b"quit now\r\n", frozenset()),
    "select from": (b"select * from users;\r\n", frozenset()),
    "Echo": (b"Echo\r\n", frozenset()),
    "keys": (b"keys to the kingdom\r\n", frozenset()),
    "config file": (b"config file missing\r\n", frozenset()),
    "client hello": (b"client hello\r\n", frozenset()),
    "subscribe": (b"Subscribe to our newsletter\r\n", frozenset()),
    "blank line": (b"\r\n", frozenset()),
    "lone lf": (b"\n", frozenset()),
    "spaces": (b"   \r\n", frozenset()),
    "nul bytes": (b"\x00" * 16, frozenset()),
    "ff bytes": (b"\xff" * 16, frozenset()),
    "telnet IAC": (b"\xff\xfd\x03\xff\xfb\x18", frozenset()),
    "SMTP EHLO": (b"EHLO client.example\r\n", frozenset()),
    "FTP USER": (b"USER anonymous\r\n", frozenset()),
    "IMAP login": (b"a001 LOGIN alice secret\r\n", frozenset()),
    "IRC NICK": (b"NICK alice\r\nUSER alice 0 * :Alice\r\n", frozenset()),
    "GET lowercase": (b"get / http/1.1\r\n\r\n", frozenset()),
    "HTTP/0.9 line": (b"GET /\r\n", frozenset()),
    "SSH-1.5": (b"SSH-1.5-old\r\n", frozenset()),
    "ssh lowercase": (b"ssh-2.0-x\r\n", frozenset()),
    "SOCKS4 connect": (b"\x04\x01\x00\x50\x7f\x00\x00\x01alice\x00", frozenset({"socks4"})),
    "SOCKS4a connect": (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00a.test\x00", frozenset({"socks4"})),
    "SOCKS5 greeting": (b"\x05\x01\x00", frozenset({"socks5"})),
    "SOCKS5 two methods": (b"\x05\x02\x00\x02", frozenset({"socks5"})),
    "PROXY v1": (build_v1(_SRC, _DST), frozenset({"proxy_protocol"})),
    "PROXY v1 UNKNOWN": (b"PROXY UNKNOWN\r\n", frozenset({"proxy_protocol"})),
    "PROXY v2": (build_v2(_SRC, _DST), frozenset({"proxy_protocol"})),
    "PROXY v1 then hello": (build_v1(_SRC, _DST) + b"hello world\r\n", frozenset({"proxy_protocol"})),
    "TLS record alert": (b"\x15\x03\x03\x00\x02\x02\x28", frozenset()),
    "DNS over TCP query": (
        b"\x00\x1d\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01",
        frozenset(),
    ),
}


def final_verdict(matcher: IMatcher, data: bytes) -> Verdict:
    """The verdict the sniffer ends with on ``data`` alone: NEED_MORE counts as NO_MATCH."""
    verdict = matcher.match(data, INFO)
    return NO_MATCH if verdict is NEED_MORE else verdict


class NegativeTableTests(unittest.TestCase):
    """Every negative case against every protocol matcher."""

    def test_no_matcher_claims_text_or_other_protocols(self) -> None:
        """No protocol matcher matches ordinary text, or another protocol's opener, on any prefix."""
        problems = []
        for label, (data, allowed) in NEGATIVES.items():
            for m in PROTOCOL_MATCHERS:
                if m.name in allowed:
                    continue
                for i in range(1, len(data) + 1):
                    if final_verdict(m, data[:i]) is MATCH:
                        problems.append(f"{m!r} matches {label!r} after {i} bytes")
                        break
        self.assertEqual(problems, [])

    def test_allowed_matchers_do_claim_their_negatives(self) -> None:
        """The protocol openers in the table are real: their own matcher takes each one."""
        by_name: dict[str, list[IMatcher]] = {}
        for m in PROTOCOL_MATCHERS:
            by_name.setdefault(m.name, []).append(m)
        for label, (data, allowed) in NEGATIVES.items():
            for name in allowed:
                self.assertIs(by_name[name][0].match(data, INFO), MATCH, label)

    def test_monotonic_on_every_negative(self) -> None:
        """Every matcher decides monotonically over every prefix of every negative case."""
        problems = [monotonic_failure(m, data) for data, _ in NEGATIVES.values() for m in PROTOCOL_MATCHERS]
        self.assertEqual([p for p in problems if p], [])


class RedisInlineTests(unittest.TestCase):
    """Inline Redis commands are taken only in a shape Redis itself accepts."""

    def test_hello_world_is_not_redis(self) -> None:
        """``hello world`` in any case is no HELLO command: HELLO's argument is a protocol version."""
        for text in (b"hello world\r\n", b"Hello World\r\n", b"HELLO WORLD\r\n", b"hello world\n"):
            self.assertIs(final_verdict(Redis(), text), NO_MATCH, text)

    def test_title_case_words_are_text(self) -> None:
        """A command word in title case (``Ping``, ``Info``) is a sentence, not a command typed to Redis."""
        for text in (b"Ping\r\n", b"Info\r\n", b"Quit\r\n", b"Hello 3\r\n"):
            self.assertIs(final_verdict(Redis(), text), NO_MATCH, text)

    def test_inline_commands_with_their_arguments(self) -> None:
        """Inline commands in upper or lower case, with as many arguments as the command takes, match."""
        for text in (
            b"PING\r\n",
            b"ping\r\n",
            b"PING hi\r\n",
            b"HELLO\r\n",
            b"hello 3\r\n",
            b"HELLO 3 AUTH default secret\r\n",
            b"HELLO 2 SETNAME app\r\n",
            b"AUTH secret\r\n",
            b"AUTH alice secret\r\n",
            b"SELECT 2\r\n",
            b"INFO\r\n",
            b"info server\r\n",
            b"QUIT\r\n",
            b"DBSIZE\r\n",
            b"MONITOR\r\n",
            b"KEYS *\r\n",
            b"EXISTS a b\r\n",
            b"INCR counter\r\n",
            b"HGET h f\r\n",
            b"HSET h f v\r\n",
            b"MSET a 1 b 2\r\n",
            b"FLUSHALL ASYNC\r\n",
            b"CONFIG GET maxmemory\r\n",
            b"CLIENT LIST\r\n",
            b"COMMAND\r\n",
            b"SUBSCRIBE news\r\n",
            b"ECHO hi\r\n",
            b'ECHO "hello world"\r\n',
            b"PING\n",
        ):
            self.assertIs(Redis().match(text, INFO), MATCH, text)

    def test_wrong_arity_or_argument_is_text(self) -> None:
        """A command word with arguments the command cannot take is NO_MATCH."""
        for text in (
            b"hello world\r\n",
            b"ping me later\r\n",
            b"quit now\r\n",
            b"select the best\r\n",
            b"select * from users;\r\n",
            b"echo\r\n",
            b"echo one two\r\n",
            b"keys to the kingdom\r\n",
            b"incr\r\n",
            b"hget h\r\n",
            b"mset a\r\n",
            b"dbsize now\r\n",
            b"client hello\r\n",
            b"config file missing\r\n",
            b"flushall everything\r\n",
            b"auth a b c\r\n",
        ):
            self.assertIs(final_verdict(Redis(), text), NO_MATCH, text)

    def test_tab_separates_inline_arguments(self) -> None:
        """A tab between an inline command and its arguments (Redis splits at spaces and tabs alike) matches."""
        for text in (b"ECHO\thi\r\n", b"SELECT\t2\r\n", b"PING\t\r\n", b"AUTH \talice\tsecret\r\n", b"hello\t3\n"):
            self.assertIs(final_verdict(Redis(), text), MATCH, text)
            self.assertIsNone(monotonic_failure(Redis(), text), text)
        self.assertIs(final_verdict(Redis(), b"hello\tworld\r\n"), NO_MATCH)

    def test_no_argument_commands_decide_at_the_line_end(self) -> None:
        """``PING`` decides at the CR, without waiting for the LF after it."""
        self.assertIs(Redis().match(b"PING\r", INFO), MATCH)
        self.assertIs(Redis().match(b"PING", INFO), NEED_MORE)
        self.assertIs(Redis().match(b"PING h", INFO), NEED_MORE)


class OpenVPNHMACTests(unittest.TestCase):
    """tls-auth hard resets with every HMAC size OpenVPN's --auth digests give, and tls-crypt."""

    #: --auth digest -> HMAC size: MD5, SHA1 (and RIPEMD160), SHA224 (and
    #: SHA512-224, SHA3-224), SHA256 (and SHA512-256, SHA3-256, BLAKE2s256,
    #: SM3), MD5-SHA1, SHA384 (SHA3-384), SHA512 (SHA3-512, BLAKE2b512, whirlpool).
    SIZES = {"MD5": 16, "SHA1": 20, "SHA224": 28, "SHA256": 32, "MD5-SHA1": 36, "SHA384": 48, "SHA512": 64}

    def test_every_hmac_size(self) -> None:
        """A tls-auth hard reset matches with the HMAC of every digest OpenVPN accepts for --auth."""
        for digest, size in self.SIZES.items():
            for opcode in (1, 7):
                data = openvpn_hard_reset(size, opcode=opcode)
                self.assertIs(OpenVPN().match(data, INFO), MATCH, digest)
                self.assertIsNone(monotonic_failure(OpenVPN(), data), digest)

    def test_every_hmac_size_without_the_early_negotiation_tlv(self) -> None:
        """Hard resets of clients before 2.6 (no TLV after the packet id) match with every HMAC size."""
        for digest, size in self.SIZES.items():
            self.assertIs(OpenVPN().match(openvpn_hard_reset(size, tlv=False), INFO), MATCH, digest)

    def test_tls_crypt(self) -> None:
        """tls-crypt (V2) and tls-crypt-v2 (V3) hard resets match."""
        self.assertIs(OpenVPN().match(openvpn_tls_crypt_reset(), INFO), MATCH)
        self.assertIs(OpenVPN().match(openvpn_tls_crypt_reset(v2_key=True), INFO), MATCH)

    def test_packet_fitting_no_layout_is_refused(self) -> None:
        """A hard reset whose bytes fit neither plain, tls-auth nor tls-crypt is NO_MATCH."""
        for rest in (b"\x01" * 11, b"\x00\x00\x00\x00\x01" + b"\x02" * 30, b"\x01" * 4 + bytes(4) + b"\x02" * 45):
            packet = bytes([7 << 3]) + bytes.fromhex("5ac1d3f0a2b4c6e8") + rest
            self.assertIs(OpenVPN().match(len(packet).to_bytes(2, "big") + packet, INFO), NO_MATCH, rest)

    def test_v3_is_tls_crypt_only(self) -> None:
        """A V3 opcode (tls-crypt-v2 only) with a plain layout is NO_MATCH."""
        self.assertIs(OpenVPN().match(openvpn_hard_reset(opcode=10), INFO), NO_MATCH)

    def test_text_is_not_openvpn(self) -> None:
        """Text whose first bytes read as a plausible length never opens an OpenVPN session."""
        for text in (b"\x00\x2ahello world, this is not a hard reset at all!!", b"\x00\x0e" + b"8" * 14):
            self.assertIs(final_verdict(OpenVPN(), text), NO_MATCH, text)


def _openvpn_digest_sizes(openvpn: str) -> dict[str, int]:
    """Every digest ``openvpn --show-digests`` lists, with its size in bytes (NULL left out)."""
    out = subprocess.run([openvpn, "--show-digests"], capture_output=True, timeout=30, check=False).stdout
    sizes = {}
    for line in out.decode("ascii", "replace").splitlines():
        found = re.fullmatch(r"(\S+) (\d+) bit digest.*", line.strip())
        if found and int(found.group(2)):
            sizes[found.group(1)] = int(found.group(2)) // 8
    return sizes


class RealOpenVPNClientTests(unittest.TestCase):
    """The first packet of the installed ``openvpn`` client, captured on a loopback listener."""

    def setUp(self) -> None:
        openvpn = shutil.which("openvpn")
        if openvpn is None:
            raise unittest.SkipTest("openvpn is not installed")
        self.openvpn = openvpn
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        cert = make_certificate("client.test")
        for name, pem in (("cert.pem", cert.cert_pem), ("key.pem", cert.key_pem)):
            with open(os.path.join(self.dir, name), "wb") as f:
                f.write(pem)
        self.key = os.path.join(self.dir, "ta.key")
        subprocess.run([openvpn, "--genkey", "secret", self.key], capture_output=True, timeout=30, check=True)

    def first_packet(self, *options: str) -> bytes:
        """Run an OpenVPN TCP client with ``options`` and return its first packet with the length prefix."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(15)
        crt, key = os.path.join(self.dir, "cert.pem"), os.path.join(self.dir, "key.pem")
        command = [self.openvpn, "--client", "--dev", "null", "--proto", "tcp-client", "--verb", "0"]
        command += ["--remote", "127.0.0.1", str(listener.getsockname()[1]), "--connect-retry-max", "1"]
        command += ["--ca", crt, "--cert", crt, "--key", key, *options]
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(15)
                data = b""
                while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
                    chunk = connection.recv(4096)
                    if not chunk:
                        break
                    data += chunk
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
        return data

    def test_hmac_sizes_cover_every_digest_openvpn_lists(self) -> None:
        """Every digest size the installed OpenVPN offers for --auth is a tls-auth HMAC size the matcher reads."""
        sizes = _openvpn_digest_sizes(self.openvpn)
        self.assertIn("MD5", sizes)
        missing = {name: size for name, size in sizes.items() if size not in HMAC_SIZES}
        self.assertEqual(missing, {})

    def test_real_clients_with_tls_auth_and_tls_crypt(self) -> None:
        """Hard resets of a real client, plain, with tls-auth under several digests, and with tls-crypt, match."""
        for options in (
            (),
            ("--tls-auth", self.key, "1", "--auth", "MD5"),
            ("--tls-auth", self.key, "1", "--auth", "SHA1"),
            ("--tls-auth", self.key, "1", "--auth", "MD5-SHA1"),
            ("--tls-auth", self.key, "1", "--auth", "SHA512"),
            ("--tls-crypt", self.key),
        ):
            data = self.first_packet(*options)
            self.assertIs(OpenVPN().match(data, INFO), MATCH, options)
            self.assertIsNone(monotonic_failure(OpenVPN(), data), options)


def _rdp(neg_flags: int = 0, tail: bytes = b"", cookie: bytes = b"Cookie: mstshash=alice\r\n") -> bytes:
    neg = bytes([1, neg_flags]) + (8).to_bytes(2, "little") + (0x0B).to_bytes(4, "little")
    x224 = bytes([0xE0, 0, 0, 0x12, 0x34, 0]) + cookie + neg + tail
    body = bytes([len(x224)]) + x224
    return bytes([3, 0]) + (4 + len(body)).to_bytes(2, "big") + body


def _correlation(kind: int = 6, flags: int = 0, length: int = 36, reserved: bytes = bytes(16)) -> bytes:
    return bytes([kind, flags]) + length.to_bytes(2, "little") + bytes(range(1, 17)) + reserved


class RDPCorrelationTests(unittest.TestCase):
    """RDP_NEG_REQ and RDP_NEG_CORRELATION_INFO as MS-RDPBCGR 2.2.1.1.1 and 2.2.1.1.2 lay them out."""

    def test_correlation_info_follows_its_flag(self) -> None:
        """A request with CORRELATION_INFO_PRESENT and a well-formed correlation block matches."""
        self.assertIs(RDP().match(_rdp(0x08, _correlation()), INFO), MATCH)
        self.assertIs(RDP().match(_rdp(0x08, _correlation(), cookie=b""), INFO), MATCH)
        self.assertIs(RDP().match(_rdp(0x09, _correlation()), INFO), MATCH)

    def test_correlation_flag_without_a_correlation_block(self) -> None:
        """The flag followed by anything but a correlation block (or nothing) is NO_MATCH."""
        for tail in (
            b"",
            _correlation(kind=5),
            _correlation(flags=1),
            _correlation(length=35),
            _correlation(reserved=b"\x01" + bytes(15)),
            _correlation()[:-1],
            b"x" * 36,
        ):
            self.assertIs(final_verdict(RDP(), _rdp(0x08, tail)), NO_MATCH, tail)

    def test_bytes_after_the_negotiation_request(self) -> None:
        """Without the flag, nothing may follow RDP_NEG_REQ: a correlation block or junk is NO_MATCH."""
        self.assertIs(RDP().match(_rdp(0), INFO), MATCH)
        self.assertIs(RDP().match(_rdp(0, _correlation()), INFO), NO_MATCH)
        self.assertIs(RDP().match(_rdp(0, b"junk"), INFO), NO_MATCH)

    def test_negotiation_request_length_is_eight(self) -> None:
        """An RDP_NEG_REQ whose length field is not 8, or that is cut short, is NO_MATCH."""
        good = rdp_connection_request()
        self.assertIs(RDP().match(good, INFO), MATCH)
        short = _rdp(0)[:-1]
        fixed = bytes([3, 0]) + len(short).to_bytes(2, "big") + bytes([len(short) - 5]) + short[5:]
        self.assertIs(RDP().match(fixed, INFO), NO_MATCH)


class SSHPrefixTests(unittest.TestCase):
    """The SSH identification prefix decides alone."""

    def test_decides_on_the_version_prefix(self) -> None:
        """``SSH-2.0-`` and ``SSH-1.99-`` match at once, without the rest of the line or its CRLF."""
        for data in (b"SSH-2.0-", b"SSH-2.0-OpenSSH_9.2", b"SSH-1.99-", b"SSH-1.99-Cisco"):
            self.assertIs(SSH().match(data, INFO), MATCH, data)

    def test_needs_the_whole_prefix(self) -> None:
        """Before the dash after the version the verdict is still open, and wrong versions are NO_MATCH."""
        self.assertIs(SSH().match(b"SSH-2.0", INFO), NEED_MORE)
        self.assertIs(SSH().match(b"SSH-1.9", INFO), NEED_MORE)
        self.assertIs(SSH().match(b"SSH-1.5-", INFO), NO_MATCH)
        self.assertIs(SSH().match(b"SSH-2.1-", INFO), NO_MATCH)


class VariantTests(unittest.TestCase):
    """Valid variants the specifications allow, and early decisions they make possible."""

    def test_mqtt_bridge_protocol_levels(self) -> None:
        """A Mosquitto bridge's CONNECT sets the top bit of the level (0x83, 0x84, 0x85): it matches."""
        connect = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04abcd"
        for level in (0x84, 0x85):
            self.assertIs(MQTT().match(connect.replace(b"\x04\x02", bytes([level, 2])), INFO), MATCH)
        v31 = b"\x10\x12\x00\x06MQIsdp\x83\x02\x00\x3c\x00\x04abcd"
        self.assertIs(MQTT().match(v31, INFO), MATCH)
        self.assertIs(MQTT().match(connect.replace(b"\x04\x02", b"\x86\x02"), INFO), NO_MATCH)

    def test_proxy_protocol_version_decides_on_the_signature(self) -> None:
        """``ProxyProtocol(version=1)`` refuses a v2 signature at once, and the other way round."""
        self.assertIs(ProxyProtocol(version=1).match(build_v2(_SRC, _DST)[:12], INFO), NO_MATCH)
        self.assertIs(ProxyProtocol(version=2).match(b"PROXY ", INFO), NO_MATCH)
        self.assertIs(ProxyProtocol(version=2).match(b"PROXY TCP4 1.2", INFO), NO_MATCH)
        self.assertIs(ProxyProtocol(version=1).match(b"PROXY TCP4 1.2", INFO), NEED_MORE)

    def test_every_seed_still_matches(self) -> None:
        """The valid openers of every matcher still match their own matcher."""
        own = {m.name: m for m in PROTOCOL_MATCHERS if m.name not in ("http1",)}
        for name, samples in seeds().items():
            if name not in own:
                continue
            for data in samples:
                self.assertIs(own[name].match(data, INFO), MATCH, (name, data[:40]))
