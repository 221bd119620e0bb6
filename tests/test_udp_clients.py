"""
Real clients and servers through the UDP mux on loopback: dig to a
twisted.names server served in-process and to dnsmasq behind UDPProxy while
TCP on the same port number keeps working; openvpn, openssl s_client -dtls
and an aioice STUN request reaching their rules.
"""

from __future__ import annotations

import os
import shutil
import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.names import dns, hosts, server
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from muxtwist.matchers import HTTP1
from muxtwist.matchers.dns import DNS
from muxtwist.matchers.dtls import DTLS
from muxtwist.matchers.openvpn import OpenVPN
from muxtwist.matchers.stun import STUN
from muxtwist.metrics import Metrics
from muxtwist.sniffing import Rule, SniffingFactory
from muxtwist.udp import UDPMux, UDPProxy

from .udp_helpers import Recorder
from .udp_processes import start, write_certificates


def free_port() -> int:
    """A port number free for both UDP and TCP on 127.0.0.1 (bound once each, then released)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP")


def dig(port: int, name: str, *extra: str) -> defer.Deferred[tuple[bytes, bytes, int]]:
    args = ["@127.0.0.1", "-p", str(port), name, "+short", "+tries=1", "+time=3", *extra]
    return getProcessOutputAndValue(shutil.which("dig") or "dig", args, reactor=reactor)  # type: ignore[no-any-return]


class Watch(Recorder):
    """A Recorder whose first datagram fires a Deferred."""

    def __init__(self) -> None:
        super().__init__()
        self.first: defer.Deferred[bytes] = defer.Deferred()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        super().datagramReceived(datagram, addr)
        if not self.first.called:
            self.first.callback(datagram)


class DNSClientTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        if shutil.which("dig") is None or shutil.which("dnsmasq") is None:
            raise unittest.SkipTest("dig (bind9-dnsutils) and dnsmasq are needed (.ci/apt-packages.txt)")

    @defer.inlineCallbacks
    def test_dig_to_in_process_and_dnsmasq_while_tcp_works(self) -> Any:
        """dig gets answers from twisted.names in-process and dnsmasq via UDPProxy; HTTP on the TCP port still works."""
        directory = self.mktemp()
        os.makedirs(directory)
        hosts_file = os.path.join(directory, "hosts")
        with open(hosts_file, "w") as f:
            f.write("192.0.2.10 a.test\n")
        names = dns.DNSDatagramProtocol(server.DNSServerFactory(clients=[hosts.Resolver(file=hosts_file)]))
        dnsmasq_port = free_port()
        start(
            [
                "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                "--bind-interfaces", "--listen-address=127.0.0.1", f"--port={dnsmasq_port}",
                "--address=/b.test/192.0.2.20", "--pid-file=", "--user=root",
            ],
            self.addCleanup,
        )  # fmt: skip
        port = free_port()
        mux = UDPMux(
            [
                Rule(DNS(qname="*.b.test", name="dnsmasq"), UDPProxy(f"udp:host=127.0.0.1:port={dnsmasq_port}")),
                Rule(DNS(qname="b.test", name="dnsmasq-apex"), UDPProxy(f"udp:host=127.0.0.1:port={dnsmasq_port}")),
                Rule(DNS(name="names"), names),
            ],
            metrics=Metrics(),
        )
        udp_port = reactor.listenUDP(port, mux.protocol, interface="127.0.0.1")
        self.addCleanup(udp_port.stopListening)
        root = Resource()
        root.putChild(b"", Data(b"tcp still here", "text/plain"))
        tcp = SniffingFactory([Rule(HTTP1(), Site(root))], metrics=Metrics())
        tcp_port = reactor.listenTCP(port, tcp, interface="127.0.0.1")
        self.addCleanup(tcp_port.stopListening)
        for _ in range(50):  # dnsmasq is ready once it answers directly
            out, _, _ = yield dig(dnsmasq_port, "b.test", "+time=1")
            if out.strip():
                break
            yield deferLater(reactor, 0.1, lambda: None)
        results = yield defer.gatherResults(
            [
                dig(port, "a.test"),
                dig(port, "b.test"),
                dig(port, "www.b.test"),
                getProcessOutputAndValue(
                    shutil.which("curl") or "curl", ["-s", "--max-time", "30", f"http://127.0.0.1:{port}/"]
                ),
            ]
        )
        self.assertEqual(
            [(out.strip(), code) for out, _, code in results],
            [(b"192.0.2.10", 0), (b"192.0.2.20", 0), (b"192.0.2.20", 0), (b"tcp still here", 0)],
            results,
        )
        self.assertEqual(mux.stats.active, {"names": 1, "dnsmasq": 1, "dnsmasq-apex": 1})


class OtherClientTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def serve_until_first(self, rule_matcher: Any, args: list[str] | None, send: bytes | None = None) -> Any:
        """Listen with one rule, start a client (or send ``send``), and return what the rule's target first got."""
        target = Watch()
        mux = UDPMux([Rule(rule_matcher, target)], metrics=Metrics())
        port = reactor.listenUDP(0, mux.protocol, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        if args is not None:
            directory = self.mktemp()
            os.makedirs(directory)
            write_certificates(directory, "d.test")
            start([a.format(port=number) for a in args], self.addCleanup, cwd=directory, stdin=-1)
        if send is not None:
            client = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
            self.addCleanup(client.stopListening)
            client.write(send, ("127.0.0.1", number))
        target.first.addTimeout(20, reactor)
        first = yield target.first
        return first, mux

    @defer.inlineCallbacks
    def test_openvpn_client(self) -> Any:
        """A real openvpn client (UDP, --dev null: no tun device) reaches the OpenVPN rule."""
        if shutil.which("openvpn") is None:
            raise unittest.SkipTest("openvpn is not installed")
        args = ["openvpn", "--client", "--dev", "null", "--proto", "udp", "--remote", "127.0.0.1", "{port}"]
        args += ["--ca", "ca.pem", "--cert", "site.pem", "--key", "site.key", "--nobind", "--verb", "0"]
        first, _ = yield self.serve_until_first(OpenVPN(), args)
        self.assertEqual(first[0] >> 3, 7)  # P_CONTROL_HARD_RESET_CLIENT_V2

    @defer.inlineCallbacks
    def test_openssl_dtls_client(self) -> Any:
        """openssl s_client -dtls reaches the DTLS rule that asks for its SNI."""
        args = ["openssl", "s_client", "-dtls", "-connect", "127.0.0.1:{port}", "-servername", "d.test"]
        first, _ = yield self.serve_until_first(DTLS(sni="d.test"), args)
        self.assertEqual(first[:3], b"\x16\xfe\xff")

    @defer.inlineCallbacks
    def test_aioice_stun_request(self) -> Any:
        """A Binding request built by aioice, sent over a real socket, reaches the STUN rule."""
        from aioice import stun

        message = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        message.add_fingerprint()
        first, _ = yield self.serve_until_first(STUN(), None, send=bytes(message))
        self.assertEqual(first, bytes(message))
