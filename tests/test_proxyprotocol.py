"""
The PROXY protocol: the pure v1/v2 parser and builders, the matcher, the
header writer for Twisted addresses, and ProxyHeaderReader alone and behind a
real SniffingFactory.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial import unittest

from muxtwist import ConnectionInfo, Outcome, Rule, Verdict
from muxtwist.actions import Proxy
from muxtwist.matchers import Any as AnyMatcher
from muxtwist.matchers import Prefix, ProxyProtocol, RemoteAddress, plugin
from muxtwist.matchers._basic import parse_networks
from muxtwist.matchers.proxy_protocol import (
    MAX_V2_PAYLOAD,
    V2_SIGNATURE,
    ProxyProtocolError,
    Signature,
    build_v1,
    build_v2,
    parse,
    signature,
)
from muxtwist.proxyprotocol import ProxyHeaderReader, header_for
from tests.test_proxy_support import Echo, Peer, PeerFactory, backend, connect, mux, wait

TRUSTED = parse_networks(["127.0.0.0/8", "::1/128"])
FROM_LB = ConnectionInfo(peer=IPv4Address("TCP", "127.0.0.1", 5000), local=IPv4Address("TCP", "127.0.0.1", 3000))
FROM_STRANGER = ConnectionInfo(peer=IPv4Address("TCP", "192.0.2.9", 5000), local=IPv4Address("TCP", "10.0.0.1", 3000))

V1 = b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 443\r\n"
V2 = build_v2(("198.51.100.7", 40000), ("10.0.0.1", 443))


class ParseTests(unittest.TestCase):
    def test_v1_tcp4(self) -> None:
        """A v1 TCP4 line gives both addresses and its length."""
        h = parse(V1 + b"rest")
        assert h is not None
        self.assertEqual(
            (h.version, h.family, h.source, h.destination, h.length),
            (1, "TCP4", ("198.51.100.7", 40000), ("10.0.0.1", 443), len(V1)),
        )

    def test_v1_tcp6_and_unknown(self) -> None:
        """A v1 TCP6 line parses; an UNKNOWN line carries no addresses whatever follows it."""
        h = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n")
        assert h is not None
        self.assertEqual((h.family, h.source), ("TCP6", ("2001:db8::1", 1)))
        u = parse(b"PROXY UNKNOWN ff:: ignored\r\nX")
        assert u is not None
        self.assertEqual((u.family, u.source, u.length), ("UNKNOWN", None, len(b"PROXY UNKNOWN ff:: ignored\r\n")))

    def test_v1_invalid(self) -> None:
        """Bad v1 lines are refused with a reason."""
        for bad in (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY " + b"A" * 120,
        ):
            with self.assertRaises(ProxyProtocolError, msg=bad):
                parse(bad)

    def test_v1_address_with_a_scope_is_refused(self) -> None:
        """An IPv6 address with a scope (which ipaddress would take) is not an address of the v1 grammar."""
        for bad in (
            b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
            b"PROXY TCP6 fe80::1%\x1b[31mEVIL ::1 1 2\r\n",
            b"PROXY TCP6 ::1 fe80::1%1 1 2\r\n",
        ):
            with self.assertRaises(ProxyProtocolError, msg=bad) as caught:
                parse(bad)
            self.assertIn("scope", str(caught.exception))

    def test_v2_round_trips(self) -> None:
        """build_v2 and parse agree for IPv4 and IPv6, and TLVs are read."""
        h = parse(V2)
        assert h is not None
        self.assertEqual(
            (h.version, h.local, h.family, h.source, h.destination),
            (2, False, "TCP4", ("198.51.100.7", 40000), ("10.0.0.1", 443)),
        )
        six = build_v2(("2001:db8::1", 1), ("2001:db8::2", 2))
        h6 = parse(six)
        assert h6 is not None
        self.assertEqual((h6.family, h6.source, h6.destination), ("TCP6", ("2001:db8::1", 1), ("2001:db8::2", 2)))
        tlv = struct.pack("!BH", 0x02, 3) + b"a.b"
        with_tlv = V2[:14] + struct.pack("!H", 12 + len(tlv)) + V2[16:] + tlv
        ht = parse(with_tlv)
        assert ht is not None
        self.assertEqual(ht.tlvs, ((2, b"a.b"),))

    def test_v2_local_and_unspec(self) -> None:
        """LOCAL and AF_UNSPEC headers carry no addresses."""
        local = parse(build_v2(None, None, local=True))
        assert local is not None
        self.assertTrue(local.local)
        self.assertIsNone(local.source)
        unspec = parse(build_v2(None, None))
        assert unspec is not None
        self.assertEqual((unspec.local, unspec.family, unspec.length), (False, "UNKNOWN", 16))

    def test_v2_unix(self) -> None:
        """A v2 UNIX header gives the two paths."""
        body = b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0")
        h = parse(V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x31, len(body)) + body)
        assert h is not None
        self.assertEqual((h.family, h.source, h.destination), ("UNIX", "/a", "/b"))

    def test_v2_invalid(self) -> None:
        """Bad versions, commands, families, short bodies, oversized lengths and bad TLVs are refused."""
        for bad in (
            V2[:12] + b"\x11" + V2[13:],
            V2[:12] + b"\x22" + V2[13:],
            V2[:13] + b"\x12" + V2[14:],
            V2[:13] + b"\x41" + V2[14:],
            V2[:14] + b"\x00\x04" + V2[16:20],
            V2[:14] + struct.pack("!H", MAX_V2_PAYLOAD + 1),
            V2[:14] + b"\x00\x0e" + V2[16:] + b"\x01\x00",
        ):
            with self.assertRaises(ProxyProtocolError, msg=bad):
                parse(bad)

    def test_incomplete_is_none(self) -> None:
        """Every proper prefix of a valid header parses to None (need more)."""
        for header in (V1, V2):
            for i in range(len(header)):
                self.assertIsNone(parse(header[:i]), header[:i])

    def test_signature(self) -> None:
        """signature() says YES, MAYBE or NO from the first bytes."""
        self.assertEqual(signature(b"PROXY "), Signature.YES)
        self.assertEqual(signature(V2[:12]), Signature.YES)
        self.assertEqual(signature(b"PRO"), Signature.MAYBE)
        self.assertEqual(signature(b"\r\n\r"), Signature.MAYBE)
        self.assertEqual(signature(b""), Signature.MAYBE)
        self.assertEqual(signature(b"GET /"), Signature.NO)
        self.assertEqual(signature(b"\r\n\r\n"), Signature.MAYBE)
        self.assertEqual(signature(b"\r\n\r\nX"), Signature.NO)

    @settings(max_examples=2000, deadline=None)
    @given(st.binary(max_size=300))
    def test_fuzz_never_crashes(self, data: bytes) -> None:
        """Any bytes parse to a header, None, or a ProxyProtocolError; nothing else escapes."""
        for candidate in (data, b"PROXY " + data, V2_SIGNATURE + data):
            try:
                h = parse(candidate)
            except ProxyProtocolError:
                continue
            if h is not None:
                self.assertLessEqual(h.length, len(candidate))

    @settings(max_examples=300, deadline=None)
    @given(
        st.ip_addresses(),
        st.ip_addresses(),
        st.integers(0, 65535),
        st.integers(0, 65535),
        st.sampled_from([1, 2]),
    )
    def test_build_parse_round_trip(self, s: object, d: object, sp: int, dp: int, version: int) -> None:
        """What the builders write, the parser reads back, addresses equal up to v4-mapping."""
        built = (build_v1 if version == 1 else build_v2)((str(s), sp), (str(d), dp))
        h = parse(built + b"tail")
        assert h is not None
        self.assertEqual(h.length, len(built))

        def norm(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
            a = ipaddress.ip_address(ip)
            return a.ipv4_mapped if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped else a

        assert isinstance(h.source, tuple) and isinstance(h.destination, tuple)
        self.assertEqual((norm(h.source[0]), h.source[1]), (norm(str(s)), sp))
        self.assertEqual((norm(h.destination[0]), h.destination[1]), (norm(str(d)), dp))


class MatcherTests(unittest.TestCase):
    def test_matcher(self) -> None:
        """ProxyProtocol() matches complete headers, waits on partial ones, refuses the rest; it is a plugin."""
        m = plugin("proxy_protocol")
        self.assertIsInstance(m, ProxyProtocol)
        self.assertEqual(m.match(V1, ConnectionInfo()), Verdict.MATCH)
        self.assertEqual(m.match(V2[:20], ConnectionInfo()), Verdict.NEED_MORE)
        self.assertEqual(m.match(b"GET / HTTP/1.1\r\n", ConnectionInfo()), Verdict.NO_MATCH)
        self.assertEqual(ProxyProtocol(version=1).match(V2, ConnectionInfo()), Verdict.NO_MATCH)


class WriterTests(unittest.TestCase):
    def test_ipv4(self) -> None:
        """IPv4 source and destination make a TCP4 header."""
        src, dst = IPv4Address("TCP", "203.0.113.5", 1234), IPv4Address("TCP", "127.0.0.1", 3000)
        self.assertEqual(header_for(1, src, dst), b"PROXY TCP4 203.0.113.5 127.0.0.1 1234 3000\r\n")
        self.assertEqual(header_for(2, src, dst), build_v2(("203.0.113.5", 1234), ("127.0.0.1", 3000)))

    def test_ipv6(self) -> None:
        """IPv6 addresses make a TCP6 header; a scope id is dropped."""
        src, dst = IPv6Address("TCP", "2001:db8::5", 1), IPv6Address("TCP", "fe80::1%lo", 2)
        self.assertEqual(header_for(1, src, dst), b"PROXY TCP6 2001:db8::5 fe80::1 1 2\r\n")
        h = parse(header_for(2, src, dst))
        assert h is not None
        self.assertEqual((h.family, h.source, h.destination), ("TCP6", ("2001:db8::5", 1), ("fe80::1", 2)))

    def test_v4_mapped(self) -> None:
        """A v4-mapped client on a dual-stack listener is written as plain IPv4; a real mix is written as TCP6."""
        src, dst = IPv6Address("TCP", "::ffff:198.51.100.7", 1), IPv6Address("TCP", "::ffff:10.0.0.1", 2)
        self.assertEqual(header_for(1, src, dst), b"PROXY TCP4 198.51.100.7 10.0.0.1 1 2\r\n")
        h = parse(header_for(2, src, dst))
        assert h is not None
        self.assertEqual((h.family, h.source), ("TCP4", ("198.51.100.7", 1)))
        mixed = header_for(1, IPv4Address("TCP", "198.51.100.7", 1), IPv6Address("TCP", "2001:db8::1", 2))
        self.assertEqual(mixed, b"PROXY TCP6 ::ffff:c633:6407 2001:db8::1 1 2\r\n")

    def test_unix(self) -> None:
        """A UNIX socket client makes UNKNOWN (v1) or an address-less PROXY header (v2)."""
        src = UNIXAddress(b"/run/x.sock")
        self.assertEqual(header_for(1, src, src), b"PROXY UNKNOWN\r\n")
        h = parse(header_for(2, src, None))
        assert h is not None
        self.assertEqual((h.local, h.family), (False, "UNKNOWN"))
        with self.assertRaises(ValueError):
            header_for(3, src, src)


class ReaderTests(unittest.TestCase):
    def test_trusted_v1_and_v2_in_any_fragments(self) -> None:
        """From a trusted peer, v1 and v2 headers are read in fragments of any size and the rest returned."""
        for header in (V1, V2):
            for size in (1, 2, 3, 7, 16, 100):
                reader = ProxyHeaderReader(FROM_LB, TRUSTED)
                stream = header + b"GET / HTTP/1.1\r\n"
                for i in range(0, len(stream), size):
                    rest = reader.feed(stream[i : i + size])
                    if rest is not None:
                        break
                assert rest is not None
                self.assertEqual(rest + stream[i + size :], b"GET / HTTP/1.1\r\n")
                self.assertEqual(reader.info.proxy_source, IPv4Address("TCP", "198.51.100.7", 40000))
                self.assertEqual(reader.info.proxy_destination, IPv4Address("TCP", "10.0.0.1", 443))
                self.assertEqual(reader.info.source, reader.info.proxy_source)

    def test_trusted_ipv6_source(self) -> None:
        """A TCP6 header gives IPv6Address objects."""
        reader = ProxyHeaderReader(FROM_LB, TRUSTED)
        self.assertEqual(reader.feed(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n"), b"")
        self.assertEqual(reader.info.proxy_source, IPv6Address("TCP", "2001:db8::1", 1))

    def test_trusted_local_keeps_peer(self) -> None:
        """A v2 LOCAL header from a trusted peer is accepted and the real peer stays the source."""
        reader = ProxyHeaderReader(FROM_LB, TRUSTED)
        self.assertEqual(reader.feed(build_v2(None, None, local=True) + b"x"), b"x")
        self.assertIsNone(reader.info.proxy_source)
        self.assertEqual(reader.info.source, FROM_LB.peer)

    def test_trusted_without_header_refused(self) -> None:
        """A trusted peer that sends no header is refused as soon as its bytes cannot be one."""
        reader = ProxyHeaderReader(FROM_LB, TRUSTED)
        self.assertIsNone(reader.feed(b"PRO"))
        with self.assertRaises(ValueError):
            reader.feed(b"XY!")

    def test_trusted_bad_header_refused(self) -> None:
        """A malformed or oversized header from a trusted peer is refused, holding no more than the limits."""
        with self.assertRaisesRegex(ValueError, "5 fields"):
            ProxyHeaderReader(FROM_LB, TRUSTED).feed(b"PROXY TCP4 1.2.3.4\r\n")
        reader = ProxyHeaderReader(FROM_LB, TRUSTED)
        with self.assertRaisesRegex(ValueError, "107"):
            for _ in range(200):
                reader.feed(b"PROXY " if not reader._buffer else b"A")
        self.assertLessEqual(len(reader._buffer), 107)

    def test_untrusted_header_refused(self) -> None:
        """A peer outside the trusted networks that sends a header is refused, even in fragments."""
        reader = ProxyHeaderReader(FROM_STRANGER, TRUSTED)
        self.assertIsNone(reader.feed(b"PROX"))
        with self.assertRaisesRegex(ValueError, "untrusted"):
            reader.feed(b"Y TCP4 ")
        with self.assertRaises(ValueError):
            ProxyHeaderReader(FROM_STRANGER, TRUSTED).feed(V2)

    def test_untrusted_refusal_names_the_peer_as_host_port(self) -> None:
        """The refusal names the untrusted peer as host:port, not as a Twisted address object."""
        with self.assertRaises(ValueError) as raised:
            ProxyHeaderReader(FROM_STRANGER, TRUSTED).feed(V2)
        peer = FROM_STRANGER.peer
        self.assertEqual(str(raised.exception), f"PROXY protocol header from untrusted peer {peer.host}:{peer.port}")

    def test_untrusted_plain_data_passes_at_once(self) -> None:
        """An untrusted peer's ordinary bytes come back unchanged, held only while they could begin a signature."""
        reader = ProxyHeaderReader(FROM_STRANGER, TRUSTED)
        self.assertEqual(reader.feed(b"GET / HTTP/1.1\r\n"), b"GET / HTTP/1.1\r\n")
        reader = ProxyHeaderReader(FROM_STRANGER, TRUSTED)
        self.assertIsNone(reader.feed(b"P"))
        self.assertEqual(reader.feed(b"OST /"), b"POST /")
        reader = ProxyHeaderReader(FROM_STRANGER, TRUSTED)
        self.assertEqual(reader.feed(b"\x16\x03\x01"), b"\x16\x03\x01")

    def test_v4_mapped_peer_trusted(self) -> None:
        """A v4-mapped peer on a dual-stack listener is trusted by its IPv4 network."""
        info = ConnectionInfo(peer=IPv6Address("TCP", "::ffff:127.0.0.1", 1))
        self.assertTrue(ProxyHeaderReader(info, parse_networks(["127.0.0.0/8"])).trusted)


class SnifferPathTests(unittest.TestCase):
    """The reader behind a real SniffingFactory on loopback."""

    async def _through(self, header: bytes, sizes: int, **proxy: object) -> tuple[Peer, bytes, object]:
        desc, backends = backend(self, Peer)
        seen: list[ConnectionInfo] = []

        class Recording(Proxy):
            def buildProtocolForConnection(self, addr, info, rule_name):  # type: ignore[no-untyped-def]
                seen.append(info)
                return super().buildProtocolForConnection(addr, info, rule_name)

        rules = [
            Rule(RemoteAddress("198.51.100.0/24"), Recording(desc, **proxy), name="lb-client"),  # type: ignore[arg-type]
            Rule(AnyMatcher(), Recording(desc, **proxy), name="other"),  # type: ignore[arg-type]
        ]
        port, factory = mux(self, rules, accept_proxy_protocol=["127.0.0.1/32"])
        client = await connect(self, port)
        stream = header + b"hello"
        for i in range(0, len(stream), sizes):
            client.transport.write(stream[i : i + sizes])  # type: ignore[union-attr]
            await wait(_turn(), 1)
        server = await wait(backends.arrived)
        data = await server.received_at_least(5 + (28 if proxy else 0))
        return server, data, seen[0]

    async def test_fragmented_header_through_sniffer(self) -> None:
        """A v2 header sent a byte or two at a time is read, removed, and its source is what the rules see."""
        _, data, info = await self._through(V2, 2)
        self.assertEqual(data, b"hello")
        self.assertEqual(info.source, IPv4Address("TCP", "198.51.100.7", 40000))  # type: ignore[attr-defined]

    async def test_v1_header_through_sniffer_to_proxy_protocol_backend(self) -> None:
        """The accepted source travels on to a backend as a v2 header: the original client arrives intact."""
        _, data, _ = await self._through(V1, 5, proxy_protocol=2)
        h = parse(data)
        assert h is not None
        self.assertEqual(h.source, ("198.51.100.7", 40000))
        self.assertEqual(data[h.length :], b"hello")

    async def test_untrusted_refused_through_sniffer(self) -> None:
        """A PROXY header from an untrusted peer gets the connection closed, nothing reaching a backend."""
        desc, backends = backend(self, Peer)
        port, _ = mux(self, [Rule(AnyMatcher(), Proxy(desc))], accept_proxy_protocol=["192.0.2.0/24"])
        client = await connect(self, port)
        client.transport.write(V1 + b"hello")  # type: ignore[union-attr]
        await client.closed()
        self.assertEqual(backends.built, [])

    async def test_untrusted_plain_client_sniffed(self) -> None:
        """A client outside the trusted networks that sends no header is sniffed as usual."""
        desc, backends = backend(self, Peer)
        port, _ = mux(self, [Rule(AnyMatcher(), Proxy(desc))], accept_proxy_protocol=["192.0.2.0/24"])
        client = await connect(self, port)
        client.transport.write(b"PING\r\n")  # type: ignore[union-attr]
        server = await wait(backends.arrived)
        self.assertEqual(await server.received_at_least(6), b"PING\r\n")


def _turn():  # type: ignore[no-untyped-def]
    """A Deferred that fires on the next reactor turn, so each write goes out as its own segment."""
    from twisted.internet import reactor, task

    return task.deferLater(reactor, 0.005, lambda: None)


def _capture_logs(case: unittest.TestCase) -> list[dict[str, object]]:
    """Every log event emitted for the rest of the test."""
    from twisted.logger import globalLogPublisher

    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    case.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def _texts(events: list[dict[str, object]]) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events]


class PreStageTests(unittest.TestCase):
    """The PROXY pre-stage in memory: what happens to held bytes when a client stops."""

    LB = IPv4Address("TCP", "10.0.0.1", 5000)

    def _factory(self, **kw: object) -> tuple[Any, Any, Any, Any]:
        from twisted.internet import task

        from muxtwist import SniffingFactory
        from tests.test_sniffing import RecordingFactory

        greeter, fallback, target = RecordingFactory(), RecordingFactory(), RecordingFactory()
        clock = task.Clock()
        factory = SniffingFactory(
            [Rule(Prefix(b"PR"), target, name="pr")],
            accept_proxy_protocol=["10.0.0.0/8"],
            on_timeout=greeter,
            on_no_match=fallback,
            reactor=clock,
            **kw,  # type: ignore[arg-type]
        )
        return factory, clock, (greeter, fallback, target), factory

    def test_untrusted_partial_signature_is_sniffed_at_end_of_stream(self) -> None:
        """An untrusted client that sends the start of a signature and half-closes has those bytes sniffed, finally."""
        from muxtwist.testing import MemoryConnection

        factory, clock, (greeter, fallback, target), _ = self._factory()
        factory.set_rules([Rule(Prefix(b"PRX"), target, name="prx")], on_timeout=greeter, on_no_match=fallback)
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"PR")
        conn.half_close()
        self.assertEqual(conn.outcome, Outcome.NO_MATCH)
        self.assertEqual(fallback.built[0].received, b"PR")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_untrusted_partial_signature_gets_the_final_evaluation_at_timeout(self) -> None:
        """At the sniff timeout an untrusted client's held signature bytes get the final evaluation, not an abort."""
        from muxtwist.testing import MemoryConnection

        factory, clock, (greeter, fallback, target), _ = self._factory()
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"PR")
        clock.advance(5)
        self.assertEqual(conn.rule_name, "pr")
        self.assertEqual(target.built[0].received, b"PR")
        self.assertTrue(conn.transport.connected)

    def test_untrusted_silent_client_goes_to_on_timeout(self) -> None:
        """An untrusted client that sends nothing goes to on_timeout at sniff_timeout, its connection kept open."""
        from muxtwist.testing import MemoryConnection

        factory, clock, (greeter, fallback, target), _ = self._factory()
        conn = MemoryConnection(factory, clock=clock)
        clock.advance(5)
        self.assertEqual(conn.outcome, Outcome.TIMEOUT)
        self.assertEqual(greeter.built[0].events, ["made"])
        self.assertTrue(conn.transport.connected)

    def test_untrusted_crlf_then_silence_goes_to_on_no_match(self) -> None:
        """An untrusted client that sends CRLF (a v2 signature's start) and waits is sniffed with it at the timeout."""
        from muxtwist.testing import MemoryConnection

        factory, clock, (greeter, fallback, target), _ = self._factory()
        conn = MemoryConnection(factory, clock=clock)
        conn.send(b"\r\n")
        clock.advance(5)
        self.assertEqual(fallback.built[0].received, b"\r\n")

    def _cut_short(self, stop: str) -> None:
        from muxtwist.testing import MemoryConnection

        events = _capture_logs(self)
        factory, clock, (greeter, fallback, target), _ = self._factory()
        conn = MemoryConnection(factory, clock=clock, peer=self.LB)
        conn.send(V2[:20])
        if stop == "fin":
            conn.half_close()
        else:
            clock.advance(5)
        self.assertEqual(conn.outcome, Outcome.REJECTED)
        self.assertFalse(conn.transport.connected)
        self.assertEqual([f.built for f in (greeter, fallback, target)], [[], [], []])
        self.assertTrue(any("cut short" in t for t in _texts(events)), _texts(events))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_trusted_header_cut_short_by_end_of_stream_is_refused(self) -> None:
        """A trusted peer whose header is cut short by its FIN is refused and logged, never handed to a rule."""
        self._cut_short("fin")

    def test_trusted_header_cut_short_by_timeout_is_refused(self) -> None:
        """A trusted peer whose header is incomplete at the sniff timeout is refused and logged."""
        self._cut_short("timeout")

    def test_trusted_peer_counted_by_header_source_for_per_source_limit(self) -> None:
        """Distinct clients through one trusted balancer are each counted by the source their header carries."""
        from muxtwist.testing import MemoryConnection

        factory, clock, (greeter, fallback, target), _ = self._factory(max_connections_per_source=2)
        factory.set_rules([Rule(AnyMatcher(), target, name="any")])
        # A burst: all six connect before the balancer has sent any header.
        conns = [MemoryConnection(factory, clock=clock, peer=self.LB) for _ in range(6)]
        for i, conn in enumerate(conns):
            conn.send(build_v1((f"198.51.100.{i}", 40000), ("10.0.0.1", 443)) + b"hi")
        self.assertEqual([c.outcome for c in conns], [Outcome.HANDED_OFF] * 6)
        # The header's source is what the limit counts: a third from one source is refused.
        same = []
        for _ in range(3):
            conn = MemoryConnection(factory, clock=clock, peer=self.LB)
            conn.send(build_v1(("203.0.113.9", 1), ("10.0.0.1", 443)) + b"hi")
            same.append(conn.outcome)
        self.assertEqual(same, [Outcome.HANDED_OFF, Outcome.HANDED_OFF, Outcome.REJECTED])
        for c in conns:
            c.close()
        self.assertEqual(factory._per_source, {"203.0.113.9": 2})

    def test_unix_path_from_header_is_escaped_in_the_log(self) -> None:
        """A PROXY v2 AF_UNIX source path with control bytes reaches the text log escaped."""
        from muxtwist.testing import MemoryConnection

        events = _capture_logs(self)
        factory, clock, (greeter, fallback, target), _ = self._factory()
        factory.set_rules([Rule(AnyMatcher(), target, name="any")])
        path = b"/tmp/\x1b[31mred\x1b[0m\nforged line"
        body = path.ljust(108, b"\0") + b"/b".ljust(108, b"\0")
        conn = MemoryConnection(factory, clock=clock, peer=self.LB)
        conn.send(V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x31, len(body)) + body + b"hi")
        conn.close()
        ended = [t for t in _texts(events) if "ended" in t]
        self.assertEqual(len(ended), 1)
        self.assertNotIn("\x1b", ended[0])
        self.assertNotIn("\n", ended[0])
        self.assertIn("\\x1b[31mred", ended[0])


class UnixTrustTests(unittest.TestCase):
    def test_unix_entry_trusts_unix_peers_only(self) -> None:
        """accept_proxy_protocol entry "unix" trusts every peer of a UNIX-socket listener, and no TCP peer."""
        from muxtwist.proxyprotocol import Trust

        trust = Trust.parse(["unix", "192.0.2.0/24"])
        unix = ConnectionInfo(peer=UNIXAddress(None), local=UNIXAddress(b"/run/mux.sock"))
        self.assertTrue(ProxyHeaderReader(unix, trust).trusted)
        self.assertTrue(ProxyHeaderReader(FROM_STRANGER, trust).trusted)
        self.assertFalse(ProxyHeaderReader(FROM_LB, trust).trusted)
        self.assertFalse(ProxyHeaderReader(unix, Trust.parse(["127.0.0.0/8"])).trusted)
        with self.assertRaisesRegex(ValueError, "not an IP network"):
            Trust.parse(["unix:/x"])


class Greeter(Peer):
    """A server-speaks-first backend (as SMTP, FTP, MySQL): it greets before reading anything."""

    GREETING = b"220 greeter ready\r\n"

    def connectionMade(self) -> None:
        super().connectionMade()
        assert self.transport is not None
        self.transport.write(self.GREETING)


class SilentClientTests(unittest.TestCase):
    """Untrusted clients on a listener that also takes PROXY traffic, on loopback."""

    async def _greeted(self, first: bytes) -> tuple[Peer, PeerFactory]:
        desc, backends = backend(self, Greeter)
        port, _ = mux(
            self,
            [Rule(Prefix(b"GET "), Proxy("tcp:host=127.0.0.1:port=9"), name="web")],
            accept_proxy_protocol=["192.0.2.0/24"],
            sniff_timeout=0.3,
            on_timeout=Proxy(desc),
            on_no_match=Proxy(desc),
        )
        client = await connect(self, port)
        if first:
            client.transport.write(first)  # type: ignore[union-attr]
        self.assertEqual(await client.received_at_least(len(Greeter.GREETING), 5), Greeter.GREETING)
        return client, backends

    async def test_untrusted_silent_client_reaches_server_speaks_first_backend(self) -> None:
        """A direct client that sends nothing gets on_timeout's greeting at sniff_timeout, and can then talk."""
        client, backends = await self._greeted(b"")
        client.transport.write(b"HELO me\r\n")  # type: ignore[union-attr]
        self.assertEqual(await backends.built[0].received_at_least(9), b"HELO me\r\n")

    async def test_untrusted_crlf_then_silence_is_sniffed_not_reset(self) -> None:
        """A direct client that sends CRLF (a v2 signature's start) and waits is sniffed with it at sniff_timeout."""
        _, backends = await self._greeted(b"\r\n")
        self.assertEqual(await backends.built[0].received_at_least(2), b"\r\n")

    async def test_trusted_header_cut_short_by_fin_is_refused(self) -> None:
        """A trusted peer that half-closes inside its header gets the connection closed; no backend is reached."""
        desc, backends = backend(self, Peer)
        port, factory = mux(self, [Rule(AnyMatcher(), Proxy(desc))], accept_proxy_protocol=["127.0.0.1/32"])
        client = await connect(self, port)
        client.transport.write(V2[:20])  # type: ignore[union-attr]
        client.transport.loseWriteConnection()  # type: ignore[union-attr]
        await client.closed()
        self.assertEqual(backends.built, [])
        self.assertEqual(factory.stats["proxy_protocol"].total, 1)


class UnixTrustThroughHAProxyTests(unittest.TestCase):
    async def test_haproxy_sends_proxy_v2_over_a_unix_socket(self) -> None:
        """HAProxy -> unix socket -> muxtwist trusting "unix": the rules see the client's own address."""
        import os
        import signal
        import subprocess

        from twisted.internet import reactor

        from tests.test_proxy_support import free_port, need, port_open, tempdir

        haproxy = need("haproxy")
        desc, backends = backend(self, Echo)
        seen: list[ConnectionInfo] = []

        class Recording(Proxy):
            def buildProtocolForConnection(self, addr, info, rule_name):  # type: ignore[no-untyped-def]
                seen.append(info)
                return super().buildProtocolForConnection(addr, info, rule_name)

        from muxtwist import SniffingFactory

        directory = tempdir(self)
        sock = os.path.join(directory, "mux.sock")
        factory = SniffingFactory([Rule(AnyMatcher(), Recording(desc))], accept_proxy_protocol=["unix"])
        listening = reactor.listenUNIX(sock, factory)  # type: ignore[attr-defined]
        self.addCleanup(listening.stopListening)
        front = free_port()
        config = os.path.join(directory, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(
                "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n"
                f"frontend fe\n  bind 127.0.0.1:{front}\n  default_backend be\n"
                f"backend be\n  server mux unix@{sock} send-proxy-v2\n"
            )
        proc = subprocess.Popen(
            [haproxy, "-db", "-f", config],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

        def stop() -> None:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

        self.addCleanup(stop)
        await port_open(front, proc)
        client = await connect(self, front)
        client.transport.write(b"hello")  # type: ignore[union-attr]
        self.assertEqual(await client.received_at_least(5), b"hello")
        me = client.transport.getHost()  # type: ignore[union-attr]
        # HAProxy's own probe connection may be among them; ours is by its port.
        self.assertIn(IPv4Address("TCP", "127.0.0.1", me.port), [i.source for i in seen])
        self.assertTrue(all(isinstance(i.peer, UNIXAddress) for i in seen))
        self.addCleanup(factory.abort_all)
