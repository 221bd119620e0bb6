"""
examples/udp/rules.py under ``twistd muxtwist``: HTTPS, SSH and HTTP on one
TCP port; HTTP/3 for two sites by SNI, DNS and WireGuard on the same UDP
port number; each reached by a real client.
"""

from __future__ import annotations

import os
import shutil
import socket
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from tests.twistd import ROOT, twistd_command

from .test_matchers_udp import wireguard_initiation
from .test_udp_clients import dig, free_port
from .udp_processes import h3_get, h3_server, start, write_certificates


class Banner(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"SSH-2.0-backend\r\n")  # type: ignore[union-attr]


class WireGuardBackend(DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.first: defer.Deferred[bytes] = defer.Deferred()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.got.append(datagram)
        if not self.first.called:
            self.first.callback(datagram)


class ExampleTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_every_service_on_both_transports(self) -> Any:
        """curl https and http, an SSH banner, HTTP/3 to two sites, dig and a WireGuard initiation all arrive."""
        if shutil.which("dig") is None:
            raise unittest.SkipTest("dig (bind9-dnsutils) is needed")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "certs"))
        write_certificates(directory, "a.test", "b.test")
        with open(os.path.join(directory, "site.pem"), "rb") as c, open(os.path.join(directory, "site.key"), "rb") as k:
            pem = c.read() + k.read()
        with open(os.path.join(directory, "certs", "a.test.pem"), "wb") as f:
            f.write(pem)
        h3_a = h3_server(directory, "site a", self.addCleanup)
        h3_b = h3_server(directory, "site b", self.addCleanup)
        ssh = reactor.listenTCP(0, Factory.forProtocol(Banner), interface="127.0.0.1")
        self.addCleanup(ssh.stopListening)
        wireguard = WireGuardBackend()
        wg = reactor.listenUDP(0, wireguard, interface="127.0.0.1")
        self.addCleanup(wg.stopListening)
        port = free_port()
        env = dict(
            os.environ,
            PORT=str(port),
            CERT_DIR=os.path.join(directory, "certs"),
            H3_A=f"127.0.0.1:{h3_a}",
            H3_B=f"127.0.0.1:{h3_b}",
            SSH_BACKEND=f"127.0.0.1:{ssh.getHost().port}",
            WIREGUARD=f"127.0.0.1:{wg.getHost().port}",
        )
        proc = start(
            twistd_command("--config", os.path.join(ROOT, "examples", "udp", "rules.py")),
            self.addCleanup,
            env=env,
            cwd=ROOT,
        )
        for _ in range(600):  # up to 30 s for twistd to listen
            self.assertIsNone(proc.poll(), "twistd exited")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                yield deferLater(0.05)
        curl = shutil.which("curl") or "curl"
        https = yield getProcessOutputAndValue(
            curl,
            [
                "-sS",
                "--max-time",
                "30",
                "--cacert",
                "ca.pem",
                "--resolve",
                f"a.test:{port}:127.0.0.1",
                f"https://a.test:{port}/",
            ],
            path=directory,
        )
        http = yield getProcessOutputAndValue(curl, ["-sS", "--max-time", "30", f"http://127.0.0.1:{port}/"])
        banner = yield threads.deferToThread(ssh_banner, port)
        results = yield defer.gatherResults(
            [
                h3_get(directory, "https://a.test/x", port),
                h3_get(directory, "https://b.test/y", port),
                dig(port, "b.test"),
            ]
        )
        client = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(client.stopListening)
        initiation = wireguard_initiation(os.urandom(32))
        client.write(initiation, ("127.0.0.1", port))
        wireguard.first.addTimeout(10, reactor)
        got = yield wireguard.first
        self.assertEqual((https[0], https[2]), (b"https over tcp\n", 0), https)
        self.assertEqual(http[0], b"plain http\n")
        self.assertEqual(banner, b"SSH-2.0-backend\r\n")
        self.assertEqual(
            [(out.strip(), code) for out, _, code in results],
            [(b"200 site a /x", 0), (b"200 site b /y", 0), (b"192.0.2.11", 0)],
            results,
        )
        self.assertEqual(got, initiation)


def ssh_banner(port: int) -> bytes:
    """Send an SSH identification line and read what comes back (in a thread: the backend is in this reactor)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"SSH-2.0-client\r\n")
        return s.recv(100)


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)
