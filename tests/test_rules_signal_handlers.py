"""
A rules file that installs its own SIGHUP and SIGTERM handlers, run by a
real ``twistd -n muxtwist``: muxtwist keeps its own handlers, so every
SIGHUP still reloads and SIGTERM still stops, and says once per load that
the file replaced them.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable

from twisted.trial import unittest

from tests.test_admin_page import free_port, twistd, until, wait_for_port

RULES = """\
import signal

from twisted.internet.protocol import Factory

from muxtwist import Rule
from muxtwist.default import Echo
from muxtwist.matchers import Any


def _mine(signum, frame):
    pass


signal.signal(signal.SIGHUP, _mine)
signal.signal(signal.SIGTERM, _mine)

rules = [Rule(Any(), Factory.forProtocol(Echo), name="echo")]
shutdown_timeout = 5.0
"""

#: The start of the warning muxtwist logs when a rules file replaced its handlers.
REPLACED = "replaced muxtwist's handler"


def echo(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"hello\n")
        return s.recv(100)


class RulesFileSignalHandlerTests(unittest.TestCase):
    """A rules file's own signal handlers do not take SIGHUP and SIGTERM from muxtwist."""

    def test_every_sighup_reloads_though_the_rules_file_sets_its_own_handler(self) -> None:
        """Three SIGHUPs give three reloads, each load warns once, the process serves, and SIGTERM stops it."""
        tmp = tempfile.mkdtemp(prefix="muxtwist-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        rules = os.path.join(tmp, "rules.py")
        with open(rules, "w") as f:
            f.write(RULES)
        port = free_port()
        server = twistd(tmp, "--config", rules, "--port", f"tcp:{port}:interface=127.0.0.1")
        self.addCleanup(server.kill)

        def waiting(condition: Callable[[], object], what: str) -> None:
            try:
                until(condition, 15, what)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{server.output[-3000:]}") from None

        def reloads_are(n: int) -> bool:
            return server.output.count(f"reloaded {rules}") == n

        wait_for_port(port, server.proc)
        self.assertEqual(echo(port), b"hello\n")
        for n in (1, 2, 3):
            os.kill(server.proc.pid, signal.SIGHUP)
            waiting(functools.partial(reloads_are, n), f"reload {n}")
            self.assertEqual(echo(port), b"hello\n")
        self.assertIsNone(server.proc.poll())
        # The load at start and each of the three reloads.
        self.assertEqual(server.output.count(REPLACED), 4, server.output[-3000:])

        os.kill(server.proc.pid, signal.SIGTERM)
        self.assertEqual(server.wait(30), 0, server.output[-3000:])
        self.assertIn("received signal 15: stopping", server.output)


class KeepOurHandlersTests(unittest.SynchronousTestCase):
    """load_config() puts back muxtwist's handlers a rules file replaced, and only those."""

    def _rules(self) -> str:
        tmp = tempfile.mkdtemp(prefix="muxtwist-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, "rules.py")
        with open(path, "w") as f:
            f.write(RULES)
        for signum in (signal.SIGHUP, signal.SIGTERM):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        return path

    def test_muxtwists_handlers_are_put_back_with_one_warning(self) -> None:
        """A service's SIGHUP and SIGTERM handlers replaced by the file are back after load_config, with one warning."""
        from twisted.logger import globalLogPublisher

        from muxtwist.config import load_config
        from muxtwist.service import MuxService

        path = self._rules()
        service = MuxService()
        signal.signal(signal.SIGHUP, service._sighup)
        signal.signal(signal.SIGTERM, service._stop_signal)
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        load_config(path)
        self.assertEqual(signal.getsignal(signal.SIGHUP), service._sighup)
        self.assertEqual(signal.getsignal(signal.SIGTERM), service._stop_signal)
        warned = [e for e in events if REPLACED in str(e.get("log_format", ""))]
        self.assertEqual(len(warned), 1, events)
        self.assertEqual((warned[0]["path"], warned[0]["signals"]), (path, "SIGHUP, SIGTERM"))

    def test_a_handler_that_is_not_muxtwists_is_the_files_to_change(self) -> None:
        """With an embedding program's own SIGHUP handler in place, the handler the file installs stays."""
        from muxtwist.config import load_config

        path = self._rules()

        def programs(signum: int, frame: object) -> None:
            pass

        signal.signal(signal.SIGHUP, programs)
        load_config(path)
        installed = signal.getsignal(signal.SIGHUP)
        self.assertNotEqual(installed, programs)
        self.assertEqual(getattr(installed, "__name__", None), "_mine")
