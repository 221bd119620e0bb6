"""
HTTP/3 through the UDP mux: a real aioquic client asks for https://a.test/
and https://b.test/ on one UDP port; the QUIC matcher routes each flow by
SNI to one of two real aioquic HTTP/3 servers behind UDPProxy.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from muxtwist.matchers.quic import QUIC
from muxtwist.metrics import Metrics
from muxtwist.sniffing import Rule
from muxtwist.udp import UDPMux, UDPProxy

from .udp_processes import h3_get, h3_server, write_certificates


class HTTP3Tests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_two_sites_by_sni(self) -> Any:
        """Each request reaches the server of the site its SNI names; a ClientHello over two Initials too."""
        directory = self.mktemp()
        os.makedirs(directory)
        write_certificates(directory, "a.test", "b.test")
        site_a = h3_server(directory, "site a", self.addCleanup)
        site_b = h3_server(directory, "site b", self.addCleanup)
        mux = UDPMux(
            [
                Rule(QUIC(sni="a.test", alpn="h3", name="a"), UDPProxy(f"udp:host=127.0.0.1:port={site_a}")),
                Rule(QUIC(sni="b.test", alpn="h3", name="b"), UDPProxy(f"udp:host=127.0.0.1:port={site_b}")),
            ],
            metrics=Metrics(),
        )
        port = reactor.listenUDP(0, mux.protocol, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        mux_port = port.getHost().port
        results = yield defer.gatherResults(
            [
                h3_get(directory, "https://a.test/one", mux_port),
                h3_get(directory, "https://b.test/two", mux_port),
                h3_get(directory, "https://b.test/big", mux_port, extra_alpn=60),
            ]
        )
        bodies = [(out.strip(), code) for out, err, code in results]
        self.assertEqual(bodies, [(b"200 site a /one", 0), (b"200 site b /two", 0), (b"200 site b /big", 0)], results)
        self.assertEqual(mux.stats.active, {"a": 1, "b": 2})
