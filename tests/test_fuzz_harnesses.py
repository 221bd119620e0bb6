"""
The fuzz targets of ``fuzz/targets.py`` under hypothesis, in the normal test
run: every parser takes arbitrary bytes (and bytes that start like its
protocol) without raising, and keeps decided verdicts final.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz"))

from targets import SEEDS, TARGETS

EXAMPLES = 200


def _inputs(name: str) -> st.SearchStrategy[bytes]:
    """Random bytes, and seeds with bytes flipped, cut or appended."""
    seeds = [s for s in SEEDS()[name] if s]
    mutated = st.builds(
        lambda seed, cut, tail, flips: _flip(seed[:cut], flips) + tail,
        st.sampled_from(seeds),
        st.integers(0, max(len(s) for s in seeds)),
        st.binary(max_size=64),
        st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), max_size=4),
    )
    return st.one_of(st.binary(max_size=512), mutated)


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for pos, value in flips:
        if buf:
            buf[pos % len(buf)] = value
    return bytes(buf)


def _check(name: str) -> Callable[[unittest.TestCase], None]:
    target = TARGETS[name]

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_inputs(name))
    def check(self: unittest.TestCase, data: bytes) -> None:
        target(data)

    check.__doc__ = f"The {name} fuzz target holds for {EXAMPLES} generated inputs."
    return check


class FuzzTargetTests(unittest.TestCase):
    """Each fuzz target, for a bounded number of hypothesis examples."""

    test_tls = _check("tls")
    test_http_head = _check("http_head")
    test_http2 = _check("http2")
    test_proxy_protocol = _check("proxy_protocol")
    test_redis = _check("redis")
    test_postgresql = _check("postgresql")
    test_mqtt = _check("mqtt")
    test_socks = _check("socks")
    test_others = _check("others")
    test_redirect = _check("redirect")

    def test_every_target_is_run(self) -> None:
        """Every target of fuzz/targets.py has a test here and a harness in fuzz/."""
        here = {n[len("test_") :] for n in dir(self) if n.startswith("test_") and n != "test_every_target_is_run"}
        self.assertEqual(here, set(TARGETS))
        fuzz_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz")
        for name in TARGETS:
            self.assertTrue(os.path.exists(os.path.join(fuzz_dir, f"fuzz_{name}.py")), name)
