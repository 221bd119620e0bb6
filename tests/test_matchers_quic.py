"""
The QUIC matcher: Initial keys (RFC 9001 and RFC 9369 test vectors), real
client Initials from aioquic, and hand-built Initials with the ClientHello
split into CRYPTO frames across packets, datagrams and orders.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from muxtwist.interfaces import ConnectionInfo, Verdict
from muxtwist.matchers.datagram import DatagramInfo
from muxtwist.matchers.quic import QUIC, V1, V2, initial_keys, parse_initial_datagrams
from muxtwist.sniffing import Rule

from .quic_packets import crypto_frame, initial_datagrams, initial_packet, tls_client_hello
from .udp_helpers import Recorder, make_mux

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE
DCID = bytes.fromhex("8394c8f03e515708")


def zero_rtt_packet(dcid: bytes, size: int, version: int = V1) -> bytes:
    """A 0-RTT long-header packet of ``size`` bytes (its payload, which no matcher can read, random)."""
    kind = 1 if version == V1 else 2
    head = bytes([0xC0 | (kind << 4) | 1, *version.to_bytes(4, "big"), len(dcid)]) + dcid + b"\x04\x01\x02\x03\x04"
    length = size - len(head) - 2
    return head + (0x4000 | length).to_bytes(2, "big") + random.Random(size).randbytes(length)


def udp(datagrams: list[bytes]) -> tuple[bytes, DatagramInfo]:
    return b"".join(datagrams), DatagramInfo(datagrams=tuple(datagrams))


def aioquic_initials(server_name: str, alpn: list[str], version: int = V1) -> list[bytes]:
    """The first datagrams a real aioquic client sends."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    config = QuicConfiguration(
        is_client=True, alpn_protocols=alpn, server_name=server_name, supported_versions=[version]
    )
    connection = QuicConnection(configuration=config)
    connection.connect(("127.0.0.1", 4433), now=0.0)
    return [d for d, _ in connection.datagrams_to_send(now=0.0)]


class KeyTests(unittest.SynchronousTestCase):
    def test_rfc9001_initial_keys(self) -> None:
        """The v1 client Initial keys of RFC 9001 appendix A.1."""
        self.assertEqual(
            initial_keys(V1, DCID),
            (
                bytes.fromhex("1f369613dd76d5467730efcbe3b1a22d"),
                bytes.fromhex("fa044b2f42a3fd3b46fb255c"),
                bytes.fromhex("9f50449e04a0e810283a1e9933adedd2"),
            ),
        )

    def test_rfc9369_initial_keys(self) -> None:
        """The v2 client Initial keys of RFC 9369 appendix A.1."""
        self.assertEqual(
            initial_keys(V2, DCID),
            (
                bytes.fromhex("8b1a0bc121284290a29e0971b5cd045d"),
                bytes.fromhex("91f73e2351d8fa91660e909f"),
                bytes.fromhex("45b95e15235d6f45a6b19cbcb0294ba9"),
            ),
        )


class RealClientTests(unittest.SynchronousTestCase):
    def test_aioquic_v1_and_v2_by_sni_and_alpn(self) -> None:
        """A real aioquic client's Initial (v1 and v2) matches by its SNI and ALPN, and not by others."""
        for version in (V1, V2):
            data, info = udp(aioquic_initials("a.test", ["h3"], version))
            self.assertIs(QUIC().match(data, info), MATCH)
            self.assertIs(QUIC(sni="a.test", alpn="h3").match(data, info), MATCH)
            self.assertIs(QUIC(sni="*.test").match(data, info), MATCH)
            self.assertIs(QUIC(sni="b.test").match(data, info), NO_MATCH)
            self.assertIs(QUIC(alpn="hq-interop").match(data, info), NO_MATCH)
        v2data, v2info = udp(aioquic_initials("a.test", ["h3"], V2))
        self.assertIs(QUIC(versions="v1").match(v2data, v2info), NO_MATCH)

    def test_client_hello_spanning_initial_packets(self) -> None:
        """A ClientHello too big for one Initial (many ALPN values) is NEED_MORE until its last datagram."""
        datagrams = aioquic_initials("b.test", ["h3", *(f"proto-{i:03d}-padding" for i in range(60))])
        self.assertEqual(len(datagrams), 2)
        self.assertIs(QUIC(sni="b.test").match(*udp(datagrams[:1])), NEED_MORE)
        self.assertIs(QUIC(sni="b.test").match(*udp(datagrams)), MATCH)
        self.assertIs(QUIC(sni="b.test").match(*udp(datagrams[::-1])), MATCH)

    def test_stream_view_is_one_datagram(self) -> None:
        """Outside a UDP listener (a plain ConnectionInfo) the buffer is read as one datagram."""
        (datagram,) = aioquic_initials("a.test", ["h3"])
        self.assertIs(QUIC(sni="a.test").match(datagram, ConnectionInfo()), MATCH)


class HandBuiltTests(unittest.SynchronousTestCase):
    hello = tls_client_hello("a.test", ["h3", *(f"alpn-{i:03d}" for i in range(200))])

    def test_two_initial_packets_in_one_datagram(self) -> None:
        """Two coalesced Initial packets in one datagram, the second CRYPTO frame first, make one ClientHello."""
        cut = 700
        second = initial_packet(crypto_frame(cut, self.hello[cut:]), dcid=DCID, pn=1)
        first = initial_packet(crypto_frame(0, self.hello[:cut]), dcid=DCID, pn=0)
        datagram = second + first
        datagram += b"\x00" * (1200 - len(datagram))
        self.assertIs(QUIC(sni="a.test").match(*udp([datagram])), MATCH)

    def test_a_datagram_of_0rtt_alone_between_initials_waits_for_the_rest(self) -> None:
        """A later datagram of only a 0-RTT packet (a resuming client's) neither matches nor refuses the flow."""
        for version in (V1, V2):
            first, second = initial_datagrams(self.hello, [700], version=version)
            early = zero_rtt_packet(DCID, 300, version=version)
            quic = QUIC(sni="a.test")
            self.assertIs(quic.match(*udp([first, early])), NEED_MORE)
            self.assertIs(quic.match(*udp([first, early, second])), MATCH)
            self.assertIs(quic.match(*udp([first, early + early, second])), MATCH)

    def test_a_first_datagram_of_0rtt_alone_is_no_client_initial(self) -> None:
        """A flow whose first datagram is a 0-RTT packet, no Initial before it, is NO_MATCH (RFC 9000 17.2.3)."""
        first, second = initial_datagrams(self.hello, [700])
        self.assertIs(QUIC().match(*udp([zero_rtt_packet(DCID, 1200), first, second])), NO_MATCH)

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(1, 1600), max_size=4), st.randoms(use_true_random=False), st.sampled_from([V1, V2]))
    def test_any_split_and_order(self, cuts: list[int], rnd: random.Random, version: int) -> None:
        """For any cut of the ClientHello into CRYPTO frames and any datagram order: MATCH once all are in."""
        datagrams = initial_datagrams(self.hello, cuts, version=version)
        rnd.shuffle(datagrams)
        matcher = QUIC(sni="a.test", alpn="h3")
        self.assertIs(matcher.match(*udp(datagrams)), MATCH)
        for n in range(1, len(datagrams)):
            self.assertIs(matcher.match(*udp(datagrams[:n])), NEED_MORE)

    def test_malformed_initials(self) -> None:
        """Short datagrams, corrupted packets, unknown versions and a changed DCID are NO_MATCH."""
        datagrams = initial_datagrams(self.hello, [600])
        m = QUIC()
        self.assertIs(m.match(*udp(datagrams)), MATCH)
        self.assertIs(m.match(*udp([datagrams[0][:1199]])), NO_MATCH)
        broken = bytearray(datagrams[0])
        broken[100] ^= 1
        self.assertIs(m.match(*udp([bytes(broken)])), NO_MATCH)
        other = bytearray(datagrams[0])
        other[1:5] = b"\xff\x00\x00\x1d"  # draft-29
        self.assertIs(m.match(*udp([bytes(other)])), NO_MATCH)
        moved = initial_datagrams(self.hello, [600], dcid=b"\x11" * 8)
        self.assertIs(m.match(*udp([datagrams[0], moved[1]])), NO_MATCH)
        self.assertIs(m.match(*udp([b"\x16\x03\x01" + b"\x00" * 1197])), NO_MATCH)
        self.assertIs(m.match(b"", DatagramInfo()), NEED_MORE)  # nothing yet, as on a new TCP connection

    def test_datagrams_no_client_sends_cost_bounded_work(self) -> None:
        """A datagram of many coalesced Initials, or an Initial of thousands of tiny frames, is NO_MATCH unwalked."""
        partial = self.hello[:300]
        many = initial_packet(crypto_frame(0, partial) + b"\x01" * 24, dcid=DCID, pn=0)
        many += b"".join(initial_packet(b"\x01" * 24, dcid=DCID, pn=pn) for pn in range(1, 200))
        self.assertIs(QUIC().match(*udp([many])), NO_MATCH)
        tiny = initial_packet(crypto_frame(0, partial) + crypto_frame(0, b"\x01") * 4000, dcid=DCID, pad_to=16300)
        self.assertIs(QUIC().match(*udp([tiny])), NO_MATCH)
        pings = initial_packet(crypto_frame(0, partial) + b"\x01" * 8000, dcid=DCID, pad_to=8100)
        self.assertIs(QUIC().match(*udp([pings])), NO_MATCH)
        # What real clients send stays within the bounds: a ClientHello in 40 CRYPTO frames with a PING
        # between each, and an Initial and a 0-RTT-sized second Initial coalesced.
        step = len(self.hello) // 40 + 1
        frames = [b"\x01" + crypto_frame(i, self.hello[i : i + step]) for i in range(0, len(self.hello), step)]
        half = len(frames) // 2
        datagram = b"".join(
            initial_packet(b"".join(part), dcid=DCID, pn=n) for n, part in enumerate((frames[:half], frames[half:]))
        )
        self.assertIs(QUIC(sni="a.test").match(*udp([datagram])), MATCH)

    def test_short_first_dcid_refused(self) -> None:
        """A first Initial with a Destination Connection ID under 8 bytes is not a client's (RFC 9000 7.2)."""
        datagrams = initial_datagrams(self.hello[:900], [], dcid=b"\x01\x02\x03")
        self.assertIs(parse_initial_datagrams(datagrams)[0], NO_MATCH)


class MuxTests(unittest.SynchronousTestCase):
    def test_routes_quic_flows_by_sni_through_the_mux(self) -> None:
        """Two QUIC rules route each flow, every held datagram replayed, to the site its SNI names."""
        a, b = Recorder(), Recorder()
        mux, _, _ = make_mux([Rule(QUIC(sni="a.test", name="a"), a), Rule(QUIC(sni="b.test", name="b"), b)])
        big = aioquic_initials("b.test", ["h3", *(f"proto-{i:03d}-padding" for i in range(60))])
        small = aioquic_initials("a.test", ["h3"])
        mux.datagram_received(big[0], ("10.0.0.2", 2))
        mux.datagram_received(small[0], ("10.0.0.1", 1))
        mux.datagram_received(big[1], ("10.0.0.2", 2))
        self.assertEqual(a.got, [(small[0], ("10.0.0.1", 1))])
        self.assertEqual(b.got, [(big[0], ("10.0.0.2", 2)), (big[1], ("10.0.0.2", 2))])


class LaterZeroRTTTests(unittest.SynchronousTestCase):
    """What a later datagram of 0-RTT packets alone may be: the first Initial's connection's, nothing else."""

    hello = tls_client_hello("a.test", ["h3", *(f"alpn-{i:03d}" for i in range(200))])

    def test_a_later_0rtt_datagram_of_another_version_is_no_match(self) -> None:
        """A 0-RTT datagram of another QUIC version than the client's Initial is not that client's: NO_MATCH."""
        for version, other in ((V1, V2), (V2, V1)):
            first, _ = initial_datagrams(self.hello, [700], version=version)
            self.assertIs(QUIC().match(*udp([first, zero_rtt_packet(DCID, 300, version=other)])), NO_MATCH)

    def test_a_later_0rtt_datagram_to_another_connection_id_is_no_match(self) -> None:
        """A 0-RTT datagram to another Destination Connection ID than the client's Initial is NO_MATCH."""
        first, _ = initial_datagrams(self.hello, [700])
        self.assertIs(QUIC().match(*udp([first, zero_rtt_packet(b"\x11" * 8, 300)])), NO_MATCH)

    def test_a_flow_of_0rtt_datagrams_after_one_initial_ends_at_max_sniff_datagrams(self) -> None:
        """One Initial followed by 0-RTT datagrams alone is held for at most max_sniff_datagrams, then dropped."""
        target = Recorder()
        mux, _, _ = make_mux([Rule(QUIC(name="q"), target)], max_sniff_datagrams=4)
        first, _ = initial_datagrams(self.hello, [700])
        mux.datagram_received(first, ("10.0.0.1", 1))
        for n in range(10):
            mux.datagram_received(zero_rtt_packet(DCID, 300 + n), ("10.0.0.1", 1))
        self.assertEqual(target.got, [])
        self.assertEqual(len(mux.table.flows), 0)
        self.assertTrue(mux.table.is_unmatched(("10.0.0.1", 1), 0.0))

    @settings(max_examples=80, deadline=None)
    @given(st.lists(st.sampled_from(["zero", "other-version", "other-dcid", "garbage"]), min_size=1, max_size=4))
    def test_later_datagrams_never_match_without_the_whole_client_hello(self, later: list[str]) -> None:
        """Whatever later datagrams follow a first Initial carrying part of the ClientHello, the flow never matches."""
        first, second = initial_datagrams(self.hello, [700])
        make = {
            "zero": lambda: zero_rtt_packet(DCID, 300),
            "other-version": lambda: zero_rtt_packet(DCID, 300, version=V2),
            "other-dcid": lambda: zero_rtt_packet(b"\x22" * 8, 300),
            "garbage": lambda: b"\xd0" + random.Random(7).randbytes(40),
        }
        datagrams = [first, *(make[kind]() for kind in later)]
        verdict = QUIC().match(*udp(datagrams))
        self.assertIn(verdict, (NEED_MORE, NO_MATCH))
        if set(later) == {"zero"}:
            self.assertIs(verdict, NEED_MORE)
            self.assertIs(QUIC().match(*udp([*datagrams, second])), MATCH)
        else:
            self.assertIs(verdict, NO_MATCH)
