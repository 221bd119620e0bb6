"""
The datagram parsers' fuzz targets (fuzz/udp_targets.py) under hypothesis:
random bytes and mutated real openers, cut into datagrams, never raise.
"""

from __future__ import annotations

import os
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz"))

from udp_targets import UDP_TARGETS

from .quic_packets import initial_datagrams, tls_client_hello
from .test_matchers_udp import dns_query, dtls_hello_body, dtls_records, stun_message, wireguard_initiation

SEEDS = {
    "quic": b"\x01" + b"".join(initial_datagrams(tls_client_hello("a.test", ["h3"]), [200])),
    "dns": b"\x00" + dns_query(b"a.test"),
    "wireguard": b"\x00" + wireguard_initiation(b"k" * 32),
    "dtls": b"\x01" + b"".join(dtls_records(dtls_hello_body(b"d.test", [b"x"]), 2)),
    "stun": b"\x00" + stun_message(),
    "openvpn_udp": b"\x00" + bytes([7 << 3]) + b"\x01" * 8 + b"\x00" * 5,
}


def _inputs(name: str) -> st.SearchStrategy[bytes]:
    seed = SEEDS[name]
    mutated = st.builds(
        lambda cut, flips, tail: bytes(_flip(bytearray(seed[:cut]), flips)) + tail,
        st.integers(0, len(seed)),
        st.lists(st.tuples(st.integers(1, len(seed)), st.integers(0, 255)), max_size=4),
        st.binary(max_size=32),
    )
    return st.one_of(st.binary(max_size=1500), mutated)


def _flip(buf: bytearray, flips: list[tuple[int, int]]) -> bytearray:
    for pos, value in flips:
        if buf:
            buf[pos % len(buf)] = value
    return buf


class UDPFuzzTests(unittest.SynchronousTestCase):
    pass


def _make(name: str) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_inputs(name))
    def check(self: unittest.SynchronousTestCase, data: bytes) -> None:
        UDP_TARGETS[name](data)

    check.__doc__ = f"The {name} datagram parser takes any bytes, cut into datagrams, without raising."
    setattr(UDPFuzzTests, f"test_{name}", check)


for _name in UDP_TARGETS:
    _make(_name)
