"""
Out of file descriptors: Twisted's listening port closes each waiting client
and logs a line per client; muxtwist counts every one and logs at most one
line a second.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import tempfile
import time
from collections.abc import Generator
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial import unittest

from muxtwist._listener import Listener
from muxtwist.matchers import Prefix
from muxtwist.metrics import EmfileThrottle, Metrics
from muxtwist.sniffing import Rule, SniffingFactory
from tests.processes import stop_group
from tests.twistd import ROOT, free_port, twistd_command, wait_for_port

CLOSED = "EMFILE recovery: Closed socket from {address}"


class EmfileThrottleTests(unittest.SynchronousTestCase):
    """The per-port log observer, on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics()
        self.forwarded: list[LogEvent] = []
        self.throttle = EmfileThrottle(self.metrics, self.clock, forward=self.forwarded.append)

    def closed(self, n: int) -> None:
        for i in range(n):
            self.throttle({"log_format": CLOSED, "address": f"client-{i}"})

    def test_one_line_a_second_and_every_client_counted(self) -> None:
        """500 clients closed in 2.5 s give 3 lines, each saying how many were left out; all 500 are counted."""
        for _ in range(5):
            self.closed(100)
            self.clock.advance(0.5)
        # Each hundred comes at one instant: the lines at 1 s and 2 s are tails, which count only those left out.
        self.assertEqual(len(self.forwarded), 3)
        self.assertEqual([e["suppressed"] for e in self.forwarded], [0, 199, 200])
        self.throttle.flush()
        self.assertEqual(1 + sum(e["suppressed"] for e in self.forwarded), 500)
        self.assertEqual(self.metrics.value("muxtwist_limit_rejections_total", limit="emfile"), 500)

    def test_other_events_pass_unchanged(self) -> None:
        """Whatever else the port logs reaches the log as it was."""
        event: LogEvent = {"log_format": "something else {x}", "x": 1}
        self.throttle(event)
        self.assertEqual(self.forwarded, [event])


class TwistdOutOfDescriptorsTests(unittest.TestCase):
    """A real ``twistd muxtwist`` with a small descriptor limit under a connect loop."""

    def test_connect_loop_at_the_descriptor_limit_logs_about_a_line_a_second(self) -> None:
        """Hundreds of clients closed for want of descriptors in 3 s give at most 5 lines (tail too); it serves on."""
        folder = tempfile.mkdtemp(prefix="muxtwist-emfile-")
        log_path = os.path.join(folder, "twistd.log")
        port = free_port()
        command = shlex.join(twistd_command("--port", f"tcp:{port}:interface=127.0.0.1"))
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                ["sh", "-c", f"ulimit -n 64 && exec {command}"],
                cwd=folder,
                env=dict(os.environ, PYTHONPATH=ROOT),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.addCleanup(lambda: (stop_group(proc), proc.wait(30)))
        try:
            wait_for_port(port, proc)
        except RuntimeError as e:
            with open(log_path, errors="replace") as f:
                raise RuntimeError(f"{e}; its log: {f.read()[-3000:]}") from None
        held: list[socket.socket] = []
        self.addCleanup(lambda: [s.close() for s in held])
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and len(held) < 2000:
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=1)
            except OSError:
                continue
            held.append(s)
        for s in held:
            s.close()
        held.clear()
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"hello\n")
            s.shutdown(socket.SHUT_WR)
            self.assertEqual(s.recv(100), b"hello\n")
        with open(log_path, errors="replace") as f:
            log = f.read()
        raw = log.count("EMFILE recovery: Closed socket")
        lines = re.findall(r"out of file descriptors: closed a waiting client .* and (\d+) more", log)
        # A burst's tail: the count left out, in a line of its own.
        tails = re.findall(r"out of file descriptors: closed (\d+) more waiting clients", log)
        self.assertEqual(raw, 0, "Twisted's per-client lines reached the log")
        self.assertGreater(len(lines), 0, log[-3000:])
        self.assertLessEqual(len(lines) + len(tails), 4 + 1)
        self.assertGreater(len(lines) + sum(int(n) for n in lines + tails), 50)


class ListenerStopTests(unittest.TestCase):
    """A listener's port, its EMFILE lines and its stop, on the real reactor."""

    @defer.inlineCallbacks
    def test_listener_stop_logs_the_pending_count_of_closed_clients(self) -> Generator[Any, Any, None]:
        """Clients the port closed for want of descriptors and not logged yet are logged when the listener stops."""
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        factory = SniffingFactory([Rule(Prefix(b"A"), Factory.forProtocol(Protocol), name="a")], metrics=Metrics())
        listener = Listener("tcp:0:interface=127.0.0.1", factory, reactor)
        listener.privilegedStartService()
        listener.startService()
        for i in range(3):
            listener.port._logger.info(CLOSED, address=("127.0.0.1", 40000 + i))
        yield listener.stopService()
        # A line about one client stands for it and those it counts; the tail line for those it counts.
        told = [(e["log_format"], e["suppressed"]) for e in events if "out of file" in e.get("log_format", "")]
        self.assertEqual(sum(n + ("a waiting client" in f) for f, n in told), 3)
