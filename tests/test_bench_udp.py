"""
The UDP benchmark's parts on loopback, briefly: its queries, the echo
backend, the load generator, and twistd muxtwist serving its rules file.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from twisted.trial import unittest

from bench import udp
from bench._procs import Servers, free_port


class UDPBenchTests(unittest.TestCase):
    def test_query_carries_its_sequence_number(self) -> None:
        """Each query is a 42-byte DNS query whose name carries the sequence number the answer is matched by."""
        from muxtwist.interfaces import Verdict
        from muxtwist.matchers import DNS
        from muxtwist.matchers.datagram import DatagramInfo

        datagram = udp.query(0xABCDEF)
        self.assertEqual(len(datagram), 42)
        self.assertEqual(udp.seq_of(datagram), 0xABCDEF)
        self.assertIs(DNS().match(datagram, DatagramInfo(datagrams=(datagram,))), Verdict.MATCH)
        self.assertIsNone(udp.seq_of(b"not a query at all!!!!!!!!!!"))

    def test_load_through_twistd_muxtwist_to_the_echo_backend(self) -> None:
        """The load generator gets every query answered, directly and through twistd muxtwist with the rules file."""
        with tempfile.TemporaryDirectory() as work, Servers(Path(work)) as servers:
            backend = free_port()
            echo = servers.start("udp-echo", [sys.executable, "-m", "bench.udp", "echo", "--port", str(backend)])
            udp.wait_udp(echo, backend)
            port = free_port()
            rules = udp.rules_file(Path(work), port, backend)
            mux = servers.start("mux", ["twistd", "-n", "--pidfile=", "-l", "-", "muxtwist", "--config", str(rules)])
            udp.wait_udp(mux, port)
            for target in (backend, port):
                figures = udp.run_load(target, flows=2, in_flight=2, seconds=0.5, prefix=[])
                self.assertGreater(figures["answered"], 0)
                self.assertEqual(figures["lost"], 0)
                self.assertLessEqual(figures["p50_ms"], figures["p99_ms"])
