"""
UDP listeners in rules files, MuxService and ``twistd muxtwist`` options:
``udp:`` descriptions as ``listeners`` keys and ``--port`` values, target
checks, UDP settings, reload.
"""

from __future__ import annotations

import os
import socket
import textwrap
from typing import Any

from twisted.internet import defer, threads
from twisted.python import usage
from twisted.trial import unittest

from muxtwist.config import ConfigError, load_config
from muxtwist.service import MuxService
from muxtwist.tap import Options
from muxtwist.udp import UDPListener

HEAD = """
from twisted.internet.protocol import DatagramProtocol
from twisted.web.server import Site
from twisted.web.static import Data
from muxtwist import Rule
from muxtwist.matchers import DNS, HTTP1, Prefix

class Echo(DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)
"""


class UDPConfigTests(unittest.TestCase):
    def write(self, body: str) -> str:
        path = self.mktemp() + ".py"
        with open(path, "w") as f:
            f.write(HEAD + textwrap.dedent(body))
        return path

    def test_udp_listener_keys_and_settings(self) -> None:
        """udp: and udp6: keys of listeners load next to tcp: ones, with the UDP settings."""
        config = load_config(
            self.write(
                """
                listeners = {
                    "tcp:0": [Rule(HTTP1(), Site(Data(b"x", "text/plain")))],
                    "udp:0:interface=127.0.0.1": [Rule(DNS(), Echo())],
                    "udp6:0:interface=\\\\:\\\\:1": [Rule(Prefix(b"x"), Echo())],
                }
                max_udp_flows = 500
                max_flows_per_source = 8
                max_sniff_datagrams = 2
                """
            )
        )
        self.assertEqual(set(config.listeners), {"tcp:0", "udp:0:interface=127.0.0.1", "udp6:0:interface=\\:\\:1"})
        s = config.settings
        self.assertEqual((s.max_udp_flows, s.max_flows_per_source, s.max_sniff_datagrams), (500, 8, 2))

    def test_wrong_targets_are_config_errors(self) -> None:
        """A TCP factory on a UDP listener, a DatagramProtocol on a TCP one and a bad udp: key are clear errors."""
        for body, words in (
            ('listeners = {"udp:0": [Rule(HTTP1(), Site(Data(b"x", "text/plain")))]}', "DatagramProtocol"),
            ('listeners = {"tcp:0": [Rule(DNS(), Echo())]}', "only UDP"),
            ('listeners = {"udp:notaport": [Rule(DNS(), Echo())]}', "udp:notaport"),
            ('listeners = {"udp:0": [Rule(DNS(), Echo())]}\nmax_udp_flows = 0', "max_udp_flows"),
        ):
            with self.assertRaises(ConfigError) as e:
                load_config(self.write(body))
            self.assertIn(words, str(e.exception))

    def test_port_option(self) -> None:
        """--port udp:443 is accepted with a rules file, refused without one and with --workers."""
        path = self.write("rules = [Rule(DNS(), Echo())]")
        options = Options()
        options.parseOptions(["--port", "udp:0:interface=127.0.0.1", "--config", path])
        self.assertEqual(options["port"], ["udp:0:interface=127.0.0.1"])
        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--port", "udp:0"])
        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--port", "udp:0", "--config", path, "--workers", "2"])
        with self.assertRaises((usage.UsageError, SystemExit)) as e:
            Options().parseOptions(["--port", "udp:x", "--config", path])
        self.assertIn("bad UDP listener 'udp:x'", str(e.exception))

    @defer.inlineCallbacks
    def test_service_listens_and_reloads(self) -> Any:
        """MuxService starts a UDP listener from a rules file, gives it new rules on reload, stops it on stop."""
        path = self.write('listeners = {"udp:0:interface=127.0.0.1": [Rule(DNS(), Echo())]}')
        service = MuxService(config_path=path)
        service.load(load_config(path))
        service.startService()
        (listener,) = [s for s in service if isinstance(s, UDPListener)]
        self.assertIsNotNone(listener.port)
        self.assertEqual([r.name for r in listener.factory.rules], ["dns"])
        with open(path, "a") as f:
            f.write('\nlisteners = {"udp:0:interface=127.0.0.1": [Rule(Prefix(b"x", name="x"), Echo())]}\n')
        self.assertTrue((yield service.reload()))
        self.assertEqual([r.name for r in listener.factory.rules], ["x"])
        yield service.stopService()
        self.assertIsNone(listener.port)
        os.remove(path)

    @defer.inlineCallbacks
    def test_reload_changing_description_keeps_the_port(self) -> Any:
        """A reload moving a UDP listener to another interface on the same port closes the old socket, then listens."""
        port = _free_udp_port()
        path = self.write(f'listeners = {{"udp:{port}:interface=127.0.0.1": [Rule(Prefix(b"x", name="x"), Echo())]}}')
        service = MuxService(config_path=path)
        service.load(load_config(path))
        service.startService()
        try:
            self.assertEqual((yield threads.deferToThread(_ask, port, b"x1")), b"x1")
            with open(path, "a") as f:
                f.write(f'\nlisteners = {{"udp:{port}": [Rule(Prefix(b"x", name="x"), Echo())]}}\n')
            self.assertTrue((yield service.reload()))
            self.assertEqual((yield threads.deferToThread(_ask, port, b"x2")), b"x2")
            with open(path, "a") as f:
                f.write(f'\nlisteners = {{"udp:port={port}": [Rule(Prefix(b"y", name="y"), Echo())]}}\n')
            (listener,) = [s for s in service if isinstance(s, UDPListener)]
            socket_before = listener.port
            self.assertTrue((yield service.reload()))
            # The same address written another way keeps its socket (and so its live flows).
            self.assertIs(next(s for s in service if isinstance(s, UDPListener)).port, socket_before)
            self.assertEqual((yield threads.deferToThread(_ask, port, b"y3")), b"y3")
        finally:
            yield service.stopService()
        os.remove(path)

    @defer.inlineCallbacks
    def test_reload_retries_a_udp_listener_that_could_not_listen(self) -> Any:
        """A UDP listener whose port is taken at a reload is reported, not kept, and listens at the next reload."""
        blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        blocker.bind(("127.0.0.1", 0))
        port = blocker.getsockname()[1]
        path = self.write('listeners = {"udp:0:interface=127.0.0.1": [Rule(Prefix(b"x", name="x"), Echo())]}')
        service = MuxService(config_path=path)
        service.load(load_config(path))
        service.startService()
        try:
            with open(path, "a") as f:
                f.write(f'\nlisteners = {{"udp:{port}:interface=127.0.0.1": [Rule(Prefix(b"x", name="x"), Echo())]}}\n')
            self.assertFalse((yield service.reload()))
            self.assertEqual([s for s in service if isinstance(s, UDPListener)], [])
            blocker.close()
            self.assertTrue((yield service.reload()))
            self.assertEqual((yield threads.deferToThread(_ask, port, b"x1")), b"x1")
        finally:
            blocker.close()
            yield service.stopService()
        os.remove(path)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ask(port: int, data: bytes) -> bytes:
    """One datagram to 127.0.0.1:port and its answer (a blocking client, run in a thread; 5 s at most)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(data, ("127.0.0.1", port))
        return s.recv(65535)
