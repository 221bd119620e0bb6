"""
UDP listeners under hostile or unusual use, on real loopback sockets:
reloads that change limits mid-traffic, and other edge cases found by
attacking ``twistd muxtwist`` processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from typing import Any

from twisted.internet import defer, threads
from twisted.trial import unittest

from muxtwist.config import load_config
from muxtwist.service import MuxService
from muxtwist.udp import UDPListener

HEAD = """
from twisted.internet.protocol import DatagramProtocol
from muxtwist import Rule
from muxtwist.matchers import Prefix

class Echo(DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)

listeners = {"udp:%d:interface=127.0.0.1": [Rule(Prefix(b"x", name="x"), Echo())]}
"""


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ask(port: int, data: bytes, timeout: float = 2.0) -> bytes | None:
    """One datagram from a new client socket to 127.0.0.1:port and its answer, or None after ``timeout`` seconds."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(data, ("127.0.0.1", port))
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


class ReloadLimitsTests(unittest.TestCase):
    def write(self, port: int, settings: str) -> str:
        path = self.mktemp() + ".py"
        with open(path, "w") as f:
            f.write(HEAD % port + textwrap.dedent(settings))
        self.addCleanup(os.remove, path)
        return path

    @defer.inlineCallbacks
    def start(self, path: str) -> Any:
        service = MuxService(config_path=path)
        service.load(load_config(path))
        service.startService()
        self.addCleanup(service.stopService)
        yield None
        return service

    @defer.inlineCallbacks
    def test_reload_without_a_udp_limit_restores_its_default(self) -> Any:
        """A reload of a rules file that no longer sets max_flows_per_source lifts that limit for new flows."""
        port = _free_udp_port()
        path = self.write(port, "max_flows_per_source = 1\n")
        service = yield self.start(path)
        self.assertEqual((yield threads.deferToThread(_ask, port, b"x1")), b"x1")
        # A second client socket of the same host is over the limit: dropped.
        self.assertIsNone((yield threads.deferToThread(_ask, port, b"x2", 0.5)))
        with open(path, "w") as f:
            f.write(HEAD % port)
        self.assertTrue((yield service.reload()))
        self.assertEqual((yield threads.deferToThread(_ask, port, b"x3")), b"x3")

    @defer.inlineCallbacks
    def test_reload_without_udp_settings_gives_a_new_listeners_values(self) -> Any:
        """After a reload that drops the UDP settings, the listener's limits are those of a fresh listener."""
        port = _free_udp_port()
        path = self.write(port, "max_udp_flows = 3\nmax_flows_per_source = 2\nmax_sniff_datagrams = 1\n")
        service = yield self.start(path)
        with open(path, "w") as f:
            f.write(HEAD % port)
        self.assertTrue((yield service.reload()))
        (listener,) = [s for s in service if isinstance(s, UDPListener)]
        mux = listener.factory
        fresh = MuxService(config_path=path)
        fresh.load(load_config(path))
        (new,) = [s for s in fresh if isinstance(s, UDPListener)]
        self.assertEqual(
            (mux.table.max_flows, mux.table.max_flows_per_source, mux.max_sniff_datagrams),
            (new.factory.table.max_flows, new.factory.table.max_flows_per_source, new.factory.max_sniff_datagrams),
        )


SHARED = """
from twisted.internet.protocol import DatagramProtocol
from muxtwist import Rule
from muxtwist.matchers import DNS

one = DatagramProtocol()
"""


def run_process(argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a session of its own, killed with its children after ``timeout`` seconds."""
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
        return subprocess.CompletedProcess(argv, process.returncode, out, err)


class SharedTargetTests(unittest.TestCase):
    run_process = staticmethod(run_process)

    def test_one_datagram_target_on_two_udp_listeners_is_refused_before_listening(self) -> None:
        """check and twistd refuse, in one line each, one DatagramProtocol instance on two UDP listeners."""
        a, b = _free_udp_port(), _free_udp_port()
        path = self.mktemp() + ".py"
        with open(path, "w") as f:
            f.write(
                SHARED
                + f'listeners = {{"udp:{a}:interface=127.0.0.1": [Rule(DNS(), one)],'
                + f' "udp:{b}:interface=127.0.0.1": [Rule(DNS(), one, name="again")]}}\n'
            )
        checked = self.run_process([sys.executable, "-m", "muxtwist", "check", path])
        self.assertEqual(checked.returncode, 1, checked.stdout)
        self.assertIn("one listener", checked.stderr)
        served = self.run_process(["twistd", "-n", "--pidfile=", "muxtwist", "--config", path])
        self.assertEqual(served.returncode, 1)
        self.assertIn("one listener", served.stderr)
        self.assertNotIn("Traceback", served.stdout + served.stderr)

    def test_rules_on_two_udp_ports_are_refused_before_listening(self) -> None:
        """Two --port udp: listeners given the same 'rules' of DatagramProtocol targets are refused clearly."""
        path = self.mktemp() + ".py"
        with open(path, "w") as f:
            f.write(SHARED + "rules = [Rule(DNS(), one)]\n")
        ports = [f"udp:{_free_udp_port()}:interface=127.0.0.1" for _ in range(2)]
        args = [a for p in ports for a in ("--port", p)]
        checked = self.run_process([sys.executable, "-m", "muxtwist", "check", path, *args])
        self.assertEqual(checked.returncode, 1, checked.stdout)
        self.assertIn("one listener", checked.stderr)
        served = self.run_process(["twistd", "-n", "--pidfile=", "muxtwist", "--config", path, *args])
        self.assertEqual(served.returncode, 1)
        self.assertIn("one listener", served.stderr)
        self.assertNotIn("Traceback", served.stdout + served.stderr)

    def test_proxy_idle_timeout_must_be_positive(self) -> None:
        """check refuses a UDPProxy whose idle_timeout is not a positive number (its flows would end unanswered)."""
        for value in ("0", "-1", "float('nan')", "'60'"):
            path = self.mktemp() + ".py"
            with open(path, "w") as f:
                f.write(
                    SHARED
                    + "from muxtwist.actions import UDPProxy\n"
                    + f'rules = [Rule(DNS(), UDPProxy("udp:host=127.0.0.1:port=53", idle_timeout={value}))]\n'
                )
            checked = self.run_process([sys.executable, "-m", "muxtwist", "check", path, "--port", "udp:53"])
            self.assertEqual(checked.returncode, 1, value)
            self.assertIn("idle_timeout must be a positive number", checked.stderr)


class ListenProbeTests(unittest.TestCase):
    """twistd says in one line which UDP listener cannot listen, before it starts, as it does for TCP."""

    def rules(self, *descriptions: str) -> str:
        path = self.mktemp() + ".py"
        with open(path, "w") as f:
            f.write(
                SHARED
                + "listeners = {"
                + "".join(f"{d!r}: [Rule(DNS(), DatagramProtocol())]," for d in descriptions)
                + "}\n"
            )
        return path

    def assert_refused(self, path: str, description: str) -> None:
        served = run_process(["twistd", "-n", "--pidfile=", "muxtwist", "--config", path])
        self.assertEqual(served.returncode, 1, served.stdout[-2000:])
        self.assertIn(f"muxtwist: cannot listen on {description}: the address is already in use", served.stderr)
        self.assertNotIn("Traceback", served.stdout + served.stderr)

    def test_a_udp_port_another_process_holds_is_one_line(self) -> None:
        """A UDP port already bound elsewhere ends twistd with exit 1 and one line, not a traceback."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.bind(("127.0.0.1", 0))
            description = f"udp:{other.getsockname()[1]}:interface=127.0.0.1"
            self.assert_refused(self.rules(description), description)

    def test_two_listeners_that_take_one_address_are_one_line(self) -> None:
        """udp:N next to udp:N:interface=127.0.0.1 (the second cannot bind) ends twistd with one line."""
        port = _free_udp_port()
        self.assert_refused(
            self.rules(f"udp:{port}", f"udp:{port}:interface=127.0.0.1"), f"udp:{port}:interface=127.0.0.1"
        )

    def test_the_probe_closes_every_socket_it_bound(self) -> None:
        """probe_udp_listeners binds each listener while holding the others and leaves no descriptor open."""
        from muxtwist.udp.listener import probe_udp_listeners

        before = len(os.listdir("/proc/self/fd"))
        ports = [_free_udp_port() for _ in range(3)]
        self.assertIsNone(probe_udp_listeners([f"udp:{p}:interface=127.0.0.1" for p in ports]))
        clash = [f"udp:{ports[0]}", f"udp:{ports[1]}", f"udp:{ports[0]}:interface=127.0.0.1"]
        self.assertEqual(probe_udp_listeners(clash)[0], clash[2])  # type: ignore[index]
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)

    def test_an_unescaped_ipv6_interface_says_how_to_write_it(self) -> None:
        """udp:53:interface=::1 is refused with how IPv6 colons are written in a listener description."""
        from muxtwist.udp.listener import parse_udp_description

        with self.assertRaises(ValueError) as caught:
            parse_udp_description("udp:53:interface=::1")
        self.assertIn(r"udp6:PORT:interface=\:\:1", str(caught.exception))
