"""
The datagram matchers on packets built from their specifications: DNS,
WireGuard, STUN, DTLS and OpenVPN over UDP; and how each reads a TCP stream.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.names import dns
from twisted.trial import unittest

from muxtwist.interfaces import ConnectionInfo, Verdict
from muxtwist.matchers.datagram import DatagramInfo
from muxtwist.matchers.dns import DNS
from muxtwist.matchers.dtls import DTLS, parse_dtls_client_hello
from muxtwist.matchers.openvpn import OpenVPN
from muxtwist.matchers.stun import STUN
from muxtwist.matchers.wireguard import WireGuard

from .captures import openvpn_hard_reset, openvpn_tls_crypt_reset

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE


def udp(*datagrams: bytes) -> tuple[bytes, DatagramInfo]:
    return b"".join(datagrams), DatagramInfo(datagrams=datagrams)


def dns_query(name: bytes, qtype: int = dns.A, edns: bool = True) -> bytes:
    m = dns.Message(id=1234, recDes=True)
    m.queries = [dns.Query(name, qtype, dns.IN)]
    if edns:
        m.additional = [dns._OPTHeader(udpPayloadSize=1232)]  # type: ignore[attr-defined]
    return m.toStr()  # type: ignore[no-any-return]


class DNSTests(unittest.SynchronousTestCase):
    def test_queries_match(self) -> None:
        """A, AAAA and TXT queries, with and without EDNS, match; a name glob picks by query name."""
        for q in (dns_query(b"a.test"), dns_query(b"www.Example.COM", dns.AAAA, edns=False), dns_query(b".", dns.NS)):
            self.assertIs(DNS().match(*udp(q)), MATCH)
        self.assertIs(DNS(qname="*.example.com").match(*udp(dns_query(b"www.Example.COM"))), MATCH)
        self.assertIs(DNS(qname="*.example.com").match(*udp(dns_query(b"a.test"))), NO_MATCH)

    def test_not_queries(self) -> None:
        """Responses, bad opcodes, several questions, pointers, truncated questions and junk are NO_MATCH."""
        response = dns.Message(id=1, answer=True)
        response.queries = [dns.Query(b"a.test")]
        several = dns.Message(id=1)
        several.queries = [dns.Query(b"a.test"), dns.Query(b"b.test")]
        good = dns_query(b"a.test", edns=False)
        for bad in (
            response.toStr(),
            several.toStr(),
            good[:2] + bytes([good[2] | 0x10]) + good[3:],  # opcode 2 (STATUS)
            good[:12] + b"\xc0\x0c" + good[-4:],
            good[:-3],
            good + b"trailing",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
            os.urandom(4) + b"\x00\x01\x00\x00\x00\x00\x00\x00\x3fabc",
        ):
            self.assertIs(DNS().match(*udp(bad)), NO_MATCH, bad)

    def test_tcp_form(self) -> None:
        """On TCP the query follows its 2-byte length and is NEED_MORE until the question is there."""
        q = dns_query(b"a.test")
        framed = struct.pack("!H", len(q)) + q
        self.assertIs(DNS().match(framed, ConnectionInfo()), MATCH)
        self.assertIs(DNS().match(framed[:14], ConnectionInfo()), NEED_MORE)
        self.assertIs(DNS().match(b"GET / HTTP/1.1\r\n", ConnectionInfo()), NO_MATCH)


def wireguard_initiation(server_public: bytes, mac2: bytes = b"\x00" * 16) -> bytes:
    """A handshake initiation laid out as the WireGuard paper 5.4.2 says, with a real mac1."""
    body = b"\x01\x00\x00\x00" + os.urandom(4) + os.urandom(32) + os.urandom(48) + os.urandom(28)
    key = hashlib.blake2s(b"mac1----" + server_public).digest()
    return body + hashlib.blake2s(body, key=key, digest_size=16).digest() + mac2


class WireGuardTests(unittest.SynchronousTestCase):
    public = os.urandom(32)

    def test_initiation(self) -> None:
        """A 148-byte type-1 initiation matches; with the server key, only one whose mac1 is for that server."""
        packet = wireguard_initiation(self.public)
        self.assertEqual(len(packet), 148)
        self.assertIs(WireGuard().match(*udp(packet)), MATCH)
        self.assertIs(WireGuard(public_key=self.public).match(*udp(packet)), MATCH)
        import base64

        self.assertIs(WireGuard(public_key=base64.b64encode(self.public).decode()).match(*udp(packet)), MATCH)
        self.assertIs(WireGuard(public_key=os.urandom(32)).match(*udp(packet)), NO_MATCH)

    def test_not_initiations(self) -> None:
        """Other message types, other sizes and reserved bytes set are NO_MATCH; on TCP, short is NEED_MORE."""
        packet = wireguard_initiation(self.public)
        for bad in (b"\x02" + packet[1:], packet[:147], packet + b"\x00", packet[:1] + b"\x01" + packet[2:]):
            self.assertIs(WireGuard().match(*udp(bad)), NO_MATCH)
        self.assertIs(WireGuard().match(packet[:100], ConnectionInfo()), NEED_MORE)
        with self.assertRaises(ValueError):
            WireGuard(public_key="c2hvcnQ=")


def stun_message(method: int = 0x001, klass: int = 0, attributes: bytes = b"", fingerprint: bool = True) -> bytes:
    """A STUN message laid out as RFC 5389 section 6 says."""
    kind = (method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2)
    kind |= ((klass & 1) << 4) | ((klass & 2) << 7)
    length = len(attributes) + (8 if fingerprint else 0)
    message = struct.pack("!HHI", kind, length, 0x2112A442) + os.urandom(12) + attributes
    if fingerprint:
        message += struct.pack("!HHI", 0x8028, 4, (zlib.crc32(message) ^ 0x5354554E) & 0xFFFFFFFF)
    return message


class STUNTests(unittest.SynchronousTestCase):
    def test_requests_and_indications(self) -> None:
        """Binding requests and indications, TURN Allocate, with and without FINGERPRINT, match."""
        software = struct.pack("!HH", 0x8022, 5) + b"hello\x00\x00\x00"
        for message in (
            stun_message(),
            stun_message(fingerprint=False),
            stun_message(klass=1),
            stun_message(0x003, attributes=software),
        ):
            self.assertIs(STUN().match(*udp(message)), MATCH)
        self.assertIs(STUN(methods="binding").match(*udp(stun_message(0x003))), NO_MATCH)

    def test_aioice_binding_request(self) -> None:
        """The Binding request aioice (an ICE library) builds matches."""
        from aioice import stun

        message = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        message.attributes["SOFTWARE"] = "muxtwist test"
        message.add_fingerprint()
        self.assertIs(STUN().match(*udp(bytes(message))), MATCH)

    def test_not_stun(self) -> None:
        """Responses, a wrong cookie, a bad FINGERPRINT, a wrong length and RFC 3489 messages are NO_MATCH."""
        good = stun_message()
        for bad in (
            stun_message(klass=2),
            good[:4] + b"\x00\x00\x00\x00" + good[8:],
            good[:-1] + bytes([good[-1] ^ 1]),
            good + b"\x00\x00\x00\x00",
            good[:-4],
            b"\x80" + good[1:],
        ):
            self.assertIs(STUN().match(*udp(bad)), NO_MATCH, bad)
        self.assertIs(STUN().match(good[:10], ConnectionInfo()), NEED_MORE)


def dtls_records(body: bytes, pieces: int = 1, version: bytes = b"\xfe\xfd") -> list[bytes]:
    """The ClientHello ``body`` in ``pieces`` DTLS handshake fragments, one record each (RFC 6347 4.2.3)."""
    step = -(-len(body) // pieces)
    records = []
    for seq, offset in enumerate(range(0, len(body), step)):
        chunk = body[offset : offset + step]
        handshake = b"\x01" + len(body).to_bytes(3, "big") + b"\x00\x00"
        handshake += offset.to_bytes(3, "big") + len(chunk).to_bytes(3, "big") + chunk
        records.append(b"\x16\xfe\xff\x00\x00" + seq.to_bytes(6, "big") + struct.pack("!H", len(handshake)) + handshake)
    return records


def dtls_hello_body(server_name: bytes, alpn: list[bytes]) -> bytes:
    """A DTLS 1.2 ClientHello body (with an empty cookie) offering SNI and ALPN."""
    sni = b"\x00" + struct.pack("!H", len(server_name)) + server_name
    sni_ext = struct.pack("!HHH", 0, len(sni) + 2, len(sni)) + sni
    protocols = b"".join(bytes([len(p)]) + p for p in alpn)
    alpn_ext = struct.pack("!HHH", 16, len(protocols) + 2, len(protocols)) + protocols
    extensions = sni_ext + alpn_ext
    return (
        b"\xfe\xfd"
        + os.urandom(32)
        + b"\x00"  # session id
        + b"\x00"  # cookie
        + b"\x00\x04\xc0\x2b\xc0\x2f"
        + b"\x01\x00"
        + struct.pack("!H", len(extensions))
        + extensions
    )


class DTLSTests(unittest.SynchronousTestCase):
    body = dtls_hello_body(b"d.test", [b"webrtc", b"c-webrtc"])

    def test_client_hello_by_sni_and_alpn(self) -> None:
        """A DTLS ClientHello matches by SNI and ALPN through the TLS parser."""
        data = udp(*dtls_records(self.body))
        self.assertIs(DTLS().match(*data), MATCH)
        self.assertIs(DTLS(sni="d.test", alpn="webrtc").match(*data), MATCH)
        self.assertIs(DTLS(sni="other.test").match(*data), NO_MATCH)
        verdict, hello = parse_dtls_client_hello(data[1].datagrams)
        self.assertEqual((verdict, hello and hello.sni), (MATCH, "d.test"))

    @settings(max_examples=50, deadline=None)
    @given(st.integers(1, 6), st.permutations(range(6)))
    def test_fragments_across_datagrams_any_order(self, pieces: int, order: list[int]) -> None:
        """Fragments in separate datagrams, in any order: NEED_MORE until the last, then MATCH."""
        records = dtls_records(self.body, pieces)
        ordered = [records[i] for i in order if i < len(records)]
        for n in range(1, len(ordered)):
            self.assertIs(DTLS().match(*udp(*ordered[:n])), NEED_MORE)
        self.assertIs(DTLS(sni="d.test").match(*udp(*ordered)), MATCH)

    def test_not_dtls(self) -> None:
        """TLS records, a non-zero epoch, other handshake types and cut records are NO_MATCH on UDP."""
        (record,) = dtls_records(self.body)
        for bad in (
            b"\x16\x03\x01" + record[3:],
            record[:3] + b"\x00\x01" + record[5:],
            record[:13] + b"\x02" + record[14:],
            record[:-1],
        ):
            self.assertIs(DTLS().match(*udp(bad)), NO_MATCH)
        self.assertIs(DTLS().match(record[:-1], ConnectionInfo()), NEED_MORE)


class OpenVPNUDPTests(unittest.SynchronousTestCase):
    def test_hard_resets_without_length_prefix(self) -> None:
        """OpenVPN() on UDP: the client hard-reset packets of every layout, without the length prefix, match."""
        for packet in (
            openvpn_hard_reset(),
            openvpn_hard_reset(20),
            openvpn_hard_reset(64),
            openvpn_hard_reset(opcode=1, tlv=False),
            openvpn_tls_crypt_reset(),
            openvpn_tls_crypt_reset(v2_key=True),
        ):
            self.assertIs(OpenVPN().match(*udp(packet[2:])), MATCH)

    def test_not_hard_resets(self) -> None:
        """On UDP the TCP form, other opcodes, a zero session id and short packets are NO_MATCH."""
        packet = openvpn_hard_reset()[2:]
        for bad in (
            openvpn_hard_reset(),
            bytes([(4 << 3)]) + packet[1:],
            packet[:1] + b"\x00" * 8 + packet[9:],
            packet[:10],
        ):
            self.assertIs(OpenVPN().match(*udp(bad)), NO_MATCH)
