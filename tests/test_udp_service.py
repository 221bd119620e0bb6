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
from tests.reloading import RulesFileCase

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
        """A UDP listener whose port is taken is reported, not kept (the old one serves on), and retried next reload."""
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
            self.assertEqual(
                [s.description for s in service if isinstance(s, UDPListener)], ["udp:0:interface=127.0.0.1"]
            )
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


UDP_SAY = """
from twisted.internet.protocol import DatagramProtocol
from muxtwist import Rule
from muxtwist.matchers import Prefix

class Say(DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(b"%s:" % WORD + data, addr)

listeners = {{{entries}}}
WORD = b"{word}"
"""


class UDPReloadOrderTests(RulesFileCase):
    """UDP reloads that move a listener: the new socket binds before the old one closes, or the old one serves on."""

    TEMPLATE = UDP_SAY
    ENTRY = '"{description}": [Rule(Prefix(b"HI"), Say(), name="hi")]'

    def held_udp(self, host: str, port: int) -> socket.socket:
        """A UDP socket of another server bound on ``host:port`` (0: any free one), closed at the end."""
        blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(blocker.close)
        blocker.bind((host, port))
        return blocker

    @defer.inlineCallbacks
    def test_udp_listener_moved_to_a_taken_port_keeps_serving_on_its_old_port(self) -> Any:
        """A UDP listener moved to a taken port serves on at its old port with its old rules; reload False, logged."""
        events = self.log_events()
        old = _free_udp_port()
        service = self.start(f"udp:{old}:interface=127.0.0.1")
        blocker = self.held_udp("127.0.0.1", 0)
        taken = blocker.getsockname()[1]
        self.write((f"udp:{taken}:interface=127.0.0.1",), "two")
        self.assertFalse((yield service.reload()))
        problems = [e for e in events if e.get("log_format", "").startswith("reload: cannot listen on")]
        self.assertEqual([e["description"] for e in problems], [f"udp:{taken}:interface=127.0.0.1"])
        self.assertIn("Address already in use", problems[0]["problem"])
        # The summary does not claim the reload took effect.
        summaries = [e["log_format"] for e in events if e.get("log_format", "").startswith("reloaded {path}")]
        self.assertEqual(summaries, ["reloaded {path}, but not every UDP listener it names listens"])
        self.assertEqual(
            [s.description for s in service if isinstance(s, UDPListener)], [f"udp:{old}:interface=127.0.0.1"]
        )
        self.assertEqual((yield threads.deferToThread(_ask, old, b"HI")), b"one:HI")
        blocker.close()
        self.assertTrue((yield service.reload()))
        self.assertEqual(
            [s.description for s in service if isinstance(s, UDPListener)], [f"udp:{taken}:interface=127.0.0.1"]
        )
        self.assertEqual((yield threads.deferToThread(_ask, taken, b"HI")), b"two:HI")

    @defer.inlineCallbacks
    def test_same_udp_port_that_cannot_listen_gives_the_port_back_to_the_old_listener(self) -> Any:
        """A same-port UDP listener that cannot bind gets the old one listening again with its rules, logged."""
        events = self.log_events()
        port = _free_udp_port()
        service = self.start(f"udp:{port}:interface=127.0.0.1")
        # Another process holds the port on another loopback address: all interfaces cannot bind.
        blocker = self.held_udp("127.0.0.2", port)
        self.write((f"udp:{port}",), "two")
        self.assertFalse((yield service.reload()))
        problems = [e for e in events if e.get("log_format", "").startswith("reload: cannot listen on")]
        self.assertEqual([e["description"] for e in problems], [f"udp:{port}"])
        again = [e for e in events if e.get("log_format", "").startswith("reload: listening again on")]
        self.assertEqual([e["description"] for e in again], [f"udp:{port}:interface=127.0.0.1"])
        self.assertEqual((yield threads.deferToThread(_ask, port, b"HI")), b"one:HI")
        blocker.close()
        self.assertTrue((yield service.reload()))
        self.assertEqual([s.description for s in service if isinstance(s, UDPListener)], [f"udp:{port}"])
        self.assertEqual((yield threads.deferToThread(_ask, port, b"HI")), b"two:HI")

    @defer.inlineCallbacks
    def test_removed_udp_listeners_serve_on_until_every_added_one_listens(self) -> Any:
        """Removed UDP listeners serve on with their rules while an added one cannot bind; those that can, serve."""
        first, second, third = _free_udp_port(), _free_udp_port(), _free_udp_port()
        old = (f"udp:{first}:interface=127.0.0.1", f"udp:{second}:interface=127.0.0.1")
        service = self.start(*old)
        blocker = self.held_udp("127.0.0.1", 0)
        taken = blocker.getsockname()[1]
        new = (f"udp:{third}:interface=127.0.0.1", f"udp:{taken}:interface=127.0.0.1")
        self.write(new, "two")
        self.assertFalse((yield service.reload()))
        self.assertEqual(sorted(s.description for s in service if isinstance(s, UDPListener)), sorted([*old, new[0]]))
        for port, answer in [(first, b"one:HI"), (second, b"one:HI"), (third, b"two:HI")]:
            self.assertEqual((yield threads.deferToThread(_ask, port, b"HI")), answer)
        blocker.close()
        self.assertTrue((yield service.reload()))
        self.assertEqual(sorted(s.description for s in service if isinstance(s, UDPListener)), sorted(new))
        self.assertEqual((yield threads.deferToThread(_ask, taken, b"HI")), b"two:HI")
