"""
Tests for ``twistd muxtwist`` (muxtwist.tap): the built-in default, a rules
file reached by real curl and nc clients, broken files, reload and stop.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

from twisted.trial import unittest

from tests.processes import stop_group
from tests.twistd import ROOT, Twistd, free_port, twistd_command, wait_for_port

RULES = """\
from twisted.internet.protocol import Factory, Protocol
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from muxtwist import Rule
from muxtwist.default import Echo
from muxtwist.matchers import HTTP1, Prefix


class Greeter(Protocol):
    def connectionMade(self):
        self.transport.write(b"220 greeter ready\\r\\n")

    def dataReceived(self, data):
        self.transport.write(b"250 " + data)


def page(text):
    root = Resource()
    root.putChild(b"", Data(text, "text/plain"))
    return Site(root)


rules = [
    Rule(HTTP1(host="a.test"), page(b"site A\\n"), name="a"),
    Rule(HTTP1(), page(b"site B\\n"), name="b"),
    Rule(Prefix(b"ECHO"), Factory.forProtocol(Echo), name="echo"),
]
on_timeout = Factory.forProtocol(Greeter)
sniff_timeout = 0.5
"""


def run(cmd: list[str], data: bytes | None = None, timeout: float = 20) -> bytes:
    out = subprocess.run(cmd, input=data, capture_output=True, timeout=timeout, check=True)
    return out.stdout


def dribble(port: int, data: bytes, half_close: bool = True, pause: float = 0.003) -> bytes:
    """Send one byte at a time, then read everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            s.sendall(data[i : i + 1])
            time.sleep(pause)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


class DefaultTests(unittest.TestCase):
    def test_default_status_page_and_echo(self) -> None:
        """With no rules file, HTTP gets the status page and anything else is echoed, on one port."""
        port = free_port()
        server = Twistd("--port", str(port), wait_ports=(port,))
        self.addCleanup(server.kill)
        page = run(["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/"])
        self.assertIn(b"muxtwist", page)
        self.assertIn(b"status-page", page)
        self.assertEqual(run(["nc", "-N", "127.0.0.1", str(port)], b"hello\n"), b"hello\n")
        status = json.loads(run(["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/status.json"]))
        rules = {r["name"]: r for r in status["listeners"][0]["rules"]}
        self.assertEqual(rules["status-page"]["total"], 2)
        self.assertEqual(rules["status-page"]["active"], 1)
        self.assertEqual(rules["echo"]["total"], 1)
        code, log = server.stop()
        self.assertEqual(code, 0, log)


class RulesFileTests(unittest.TestCase):
    def setUp(self) -> None:
        self.rules = os.path.abspath(self.mktemp() + "-rules.py")
        with open(self.rules, "w") as f:
            f.write(RULES)
        self.port, self.port2 = free_port(), free_port()
        self.server = Twistd(
            "--port",
            str(self.port),
            "--port",
            f"tcp:{self.port2}:interface=127.0.0.1",
            "--config",
            self.rules,
            wait_ports=(self.port, self.port2),
        )
        self.addCleanup(self.server.kill)

    def test_real_clients_reach_the_right_service(self) -> None:
        """curl by Host, nc with ECHO, a silent client and byte-by-byte clients each reach their service."""
        for port in (self.port, self.port2):
            url = f"http://127.0.0.1:{port}/"
            self.assertEqual(run(["curl", "-sS", "--max-time", "10", "-H", "Host: a.test", url]), b"site A\n")
            self.assertEqual(run(["curl", "-sS", "--max-time", "10", url]), b"site B\n")
            self.assertEqual(run(["nc", "-N", "127.0.0.1", str(port)], b"ECHO hi\n"), b"ECHO hi\n")
        request = b"GET / HTTP/1.0\r\nHost: a.test\r\n\r\n"
        self.assertTrue(dribble(self.port, request).endswith(b"site A\n"))
        self.assertTrue(dribble(self.port, request.replace(b"a.test", b"c.test")).endswith(b"site B\n"))
        self.assertEqual(dribble(self.port, b"ECHO one byte at a time"), b"ECHO one byte at a time")
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            started = time.monotonic()
            greeting = s.recv(100)
            waited = time.monotonic() - started
        self.assertEqual(greeting, b"220 greeter ready\r\n")
        self.assertGreaterEqual(waited, 0.4)
        self.assertLess(waited, 3)
        code, log = self.server.stop()
        self.assertEqual(code, 0, log)

    def test_sighup_reloads_and_broken_file_keeps_old_rules(self) -> None:
        """SIGHUP picks up a changed file; a broken one is logged and the old rules keep serving."""
        url = f"http://127.0.0.1:{self.port}/"
        with open(self.rules, "w") as f:
            f.write(RULES.replace("site B", "site B2"))
        self.server.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while run(["curl", "-sS", "--max-time", "10", url]) != b"site B2\n":
            self.assertLess(time.monotonic(), deadline, "reload did not happen")
            time.sleep(0.05)
        with open(self.rules, "w") as f:
            f.write("rules = [\n")
        self.server.signal(signal.SIGHUP)
        time.sleep(0.3)
        self.assertEqual(run(["curl", "-sS", "--max-time", "10", url]), b"site B2\n")
        code, log = self.server.stop()
        self.assertEqual(code, 0, log)
        self.assertIn("reload failed, keeping the running rules", log)
        self.assertIn("syntax error", log)

    def test_sighup_with_rules_that_raise_while_checked_keeps_old_rules(self) -> None:
        """A reload of rules whose __len__ raises is one logged error naming them, and the old rules keep serving."""
        url = f"http://127.0.0.1:{self.port}/"
        with open(self.rules, "w") as f:
            f.write(
                "class Odd(list):\n    def __len__(self):\n        raise RuntimeError('no length')\nrules = Odd()\n"
            )
        assert self.server.proc.stdout is not None
        output = self.server.proc.stdout.fileno()
        os.set_blocking(output, False)
        self.server.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        log = b""
        try:
            while b"reload failed" not in log:
                self.assertLess(time.monotonic(), deadline, "no reload line")
                time.sleep(0.05)
                try:
                    log += os.read(output, 65536)
                except BlockingIOError:
                    pass
        finally:
            os.set_blocking(output, True)
        self.assertEqual(run(["curl", "-sS", "--max-time", "10", url]), b"site B\n")
        code, rest = self.server.stop()
        log_text = log.decode(errors="replace") + rest
        self.assertEqual(code, 0, log_text)
        self.assertIn(
            f"reload failed, keeping the running rules: {self.rules}:4: rules could not be checked: "
            "RuntimeError at line 3: no length",
            log_text,
        )
        self.assertNotIn("unexpectedly", log_text)
        self.assertNotIn("Traceback", log_text)


class SecondSignalTests(unittest.TestCase):
    def test_second_sigterm_cuts_the_drain_short(self) -> None:
        """A second SIGTERM while draining aborts what is left, and the exit status is still 0."""
        rules = os.path.abspath(self.mktemp() + "-rules.py")
        with open(rules, "w") as f:
            f.write(RULES + "shutdown_timeout = 60\n")
        port = free_port()
        server = Twistd("--port", str(port), "--config", rules, wait_ports=(port,))
        self.addCleanup(server.kill)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"ECHO held open\n")
            self.assertEqual(s.recv(100), b"ECHO held open\n")
            server.signal(signal.SIGTERM)
            # The second is sent once the first is handled: two SIGTERMs pending at once are one.
            server.read_until(b"waiting up to 60s for 1 connection(s) to finish")
            self.assertIsNone(server.proc.poll(), "the first SIGTERM should wait for the open connection")
            started = time.monotonic()
            server.signal(signal.SIGTERM)
            # Waited for, not stopped: a third SIGTERM could reach the process
            # after the reactor gave SIGTERM back its default action.
            code, log = server.wait(timeout=20)
            self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(code, 0, log)
        self.assertIn("aborting the remaining connections", log)


class BrokenConfigTests(unittest.TestCase):
    def test_broken_file_is_one_message_and_non_zero_exit(self) -> None:
        """A broken rules file stops twistd with one line naming file, line and problem."""
        path = os.path.abspath(self.mktemp() + "-rules.py")
        with open(path, "w") as f:
            f.write(
                textwrap.dedent("""
                from muxtwist import Rule
                from muxtwist.matchers import HTTP1
                rules = [Rule(HTTP1(), "not a factory")]
            """)
            )
        out = subprocess.run(
            twistd_command("--port", str(free_port()), "--config", path), cwd=ROOT, capture_output=True, timeout=60
        )
        self.assertNotEqual(out.returncode, 0)
        message = out.stderr.decode()
        self.assertIn(f"{path}:4:", message)
        self.assertIn("IProtocolFactory", message)
        self.assertNotIn("Traceback", message)

    def test_rules_that_raise_while_checked_are_one_message(self) -> None:
        """Rules whose __iter__ raises stop twistd with one line naming the file, the line and the exception."""
        path = os.path.abspath(self.mktemp() + "-rules.py")
        with open(path, "w") as f:
            f.write(
                "class Odd(list):\n    def __iter__(self):\n        raise RuntimeError('no iterating')\nrules = Odd()\n"
            )
        out = subprocess.run(
            twistd_command("--port", f"tcp:{free_port()}:interface=127.0.0.1", "--config", path),
            cwd=ROOT,
            capture_output=True,
            timeout=60,
            start_new_session=True,
        )
        self.assertEqual(out.returncode, 1)
        self.assertEqual(
            out.stderr.decode(),
            f"muxtwist: {path}:4: rules could not be checked: RuntimeError at line 3: no iterating\n",
        )

    def test_option_errors_under_twistd_are_one_line(self) -> None:
        """Under twistd a usage error is SystemExit with one line and a pointer to --help; alone it is a UsageError."""
        from twisted.python import usage
        from twisted.scripts.twistd import ServerOptions

        from muxtwist.tap import Options

        # Parsing under twistd holds SIGHUP for the start-up to come: not this process's.
        self.addCleanup(signal.signal, signal.SIGHUP, signal.getsignal(signal.SIGHUP))
        error = self.assertRaises(SystemExit, ServerOptions().parseOptions, ["-n", "muxtwist", "--log-format", "xml"])
        self.assertEqual(
            error.code, "muxtwist: --log-format must be text or json, got 'xml' (see twistd muxtwist --help)"
        )
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--log-format", "xml"])

    def test_bad_port(self) -> None:
        """A --port that is not an endpoint description is refused with a clear error."""
        out = subprocess.run(twistd_command("--port", "carrier-pigeon:9"), cwd=ROOT, capture_output=True, timeout=60)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("bad endpoint description 'carrier-pigeon:9'", out.stderr.decode() + out.stdout.decode())

    def test_busy_admin_endpoint_is_named_as_the_admin_one(self) -> None:
        """An --admin endpoint that cannot listen is refused with a message that says it is --admin's, not --port's."""
        from muxtwist.tap import Options

        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        admin = f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"
        port = f"tcp:{free_port()}:interface=127.0.0.1"
        error = self.assertRaises(SystemExit, Options().parseOptions, ["--port", port, "--admin", admin])
        self.assertEqual(str(error.code).split(": the address")[0], f"muxtwist: --admin: cannot listen on {admin}")

    def test_admin_on_a_listeners_port_is_refused_in_one_line(self) -> None:
        """--admin on a listener's port (written the same or another way) is one line naming both."""
        from muxtwist.tap import Options

        port = free_port()
        for listener, admin in [
            (f"tcp:{port}:interface=127.0.0.1", f"tcp:{port}:interface=127.0.0.1"),
            (f"tcp:{port}", f"tcp:{port}:interface=127.0.0.1"),
            (f"tcp:{port}:interface=127.0.0.1", f"tcp:{port}"),
        ]:
            error = self.assertRaises(SystemExit, Options().parseOptions, ["--port", listener, "--admin", admin])
            self.assertEqual(
                error.code,
                f"muxtwist: --admin {admin} takes the address of the listener {listener}: give --admin another one",
            )
        # Two interfaces of one port can both listen.
        options = Options()
        apart = ["--port", f"tcp:{port}:interface=127.0.0.1", "--admin", f"tcp:{port}:interface=127.0.0.2"]
        options.parseOptions(apart)
        self.assertEqual(options["admin"], f"tcp:{port}:interface=127.0.0.2")

    def test_help_text_has_no_runs_of_spaces(self) -> None:
        """Each option's help in ``twistd muxtwist --help`` is wrapped text without a docstring's indentation."""
        from muxtwist.tap import Options

        lines = str(Options()).splitlines()
        column = lines[2].index("Serve /metrics")  # where every option's description starts
        for line in lines[2 : lines.index("")]:
            self.assertNotRegex(line[column:], "[^ ]  +[^ ]", line)


SLOW_RULES = """\
import os, time
from twisted.internet.protocol import Factory
from muxtwist import Rule
from muxtwist.default import Echo
from muxtwist.matchers import Prefix

with open(os.path.join({folder!r}, "loading-%d" % os.getpid()), "a") as marker:
    marker.write("x")
time.sleep({sleep})
rules = [Rule(Prefix(b"ECHO"), Factory.forProtocol(Echo), name="echo")]
"""


class Process:
    """``twistd muxtwist ARGS`` in a session of its own, stopped with its whole process group."""

    def __init__(self, test: unittest.TestCase, *args: str) -> None:
        self.proc = subprocess.Popen(
            twistd_command(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        test.addCleanup(self.kill)

    def kill(self) -> None:
        stop_group(self.proc)
        self.proc.communicate(timeout=30)

    def stop(self, timeout: float = 30.0) -> tuple[int | None, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(self.proc)
            out, _ = self.proc.communicate(timeout=30)
        return self.proc.returncode, out.decode(errors="replace")


def wait_for(condition: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout}s")
        time.sleep(0.01)


def catches_sighup(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGHUP (from /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


def ignores_or_catches_sighup(pid: int) -> bool:
    """Whether process ``pid`` ignores SIGHUP or has a handler for it (from /proc)."""
    bit = 1 << (signal.SIGHUP - 1)
    with open(f"/proc/{pid}/status") as f:
        masks = dict(line.split(":", 1) for line in f if line.startswith(("SigIgn:", "SigCgt:")))
    return any(int(value, 16) & bit for value in masks.values())


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def loads(folder: str) -> int:
    """How many times the SLOW_RULES file in ``folder`` has been loaded, by any process."""
    total = 0
    for name in os.listdir(folder):
        if name.startswith("loading-"):
            with open(os.path.join(folder, name)) as f:
                total += len(f.read())
    return total


def echo_once(port: int) -> bytes:
    return run(["nc", "-N", "-w", "10", "127.0.0.1", str(port)], b"ECHO ok\n")


class StartupSignalTests(unittest.TestCase):
    """A reload signal never kills anything, even while the process is starting."""

    def write_rules(self, sleep: float) -> tuple[str, str]:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, "rules.py")
        with open(path, "w") as f:
            f.write(SLOW_RULES.format(folder=folder, sleep=sleep))
        return folder, path

    def test_sighup_while_loading_the_rules_file_is_a_reload_later(self) -> None:
        """SIGHUP while twistd is still loading its rules file does not kill it; it reloads once started."""
        folder, path = self.write_rules(sleep=1.0)
        port = free_port()
        server = Process(self, "--port", str(port), "--config", path)
        wait_for(lambda: loads(folder) >= 1, what="rules file loading")
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(0.2)
        server.proc.send_signal(signal.SIGHUP)
        wait_for_port(port, timeout=30)
        self.assertIsNone(server.proc.poll())
        self.assertEqual(echo_once(port), b"ECHO ok\n")
        # Loaded at start-up, then once more for the SIGHUPs held meanwhile.
        wait_for(lambda: loads(folder) >= 2, what="reload after start-up")
        code, log = server.stop()
        self.assertEqual(code, 0, log)
        self.assertIn("a SIGHUP arrived during start-up: reloading now", log)
        self.assertEqual(loads(folder), 2)

    def test_sighup_forwarded_to_starting_workers_kills_none(self) -> None:
        """With --workers, SIGHUPs sent while the workers start (just spawned, loading rules) kill none of them."""
        folder, path = self.write_rules(sleep=0.3)
        port = free_port()
        server = Process(self, "--port", str(port), "--config", path, "--workers", "2")
        # Once the parent listens and catches SIGHUP itself, it is starting
        # its workers: SIGHUP it every 20 ms (it forwards each to the
        # workers) until both workers have loaded the rules, and a little longer.
        wait_for(lambda: catches_sighup(server.proc.pid) and listening(port), what="parent started")
        deadline = time.monotonic() + 30.0
        until = None
        while time.monotonic() < deadline and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGHUP)
            time.sleep(0.02)
            if until is None and loads(folder) >= 3:
                until = time.monotonic() + 0.5
            if until is not None and time.monotonic() > until:
                break
        self.assertIsNone(server.proc.poll())
        wait_for_port(port, timeout=30)
        self.assertEqual(echo_once(port), b"ECHO ok\n")
        code, log = server.stop()
        self.assertEqual(code, 0, log)
        self.assertNotIn("ended: exit code", log)
        self.assertNotIn("starting worker", log)

    def test_sighup_while_twistd_looks_for_its_plugins_is_a_reload_later(self) -> None:
        """A SIGHUP while twistd is still importing its plugins, before any option is parsed, kills nothing."""
        folder = tempfile.mkdtemp(prefix="muxtwist-slow-plugin-")
        self.addCleanup(shutil.rmtree, folder, True)
        os.makedirs(os.path.join(folder, "twisted", "plugins"))
        marker = os.path.join(folder, "importing")
        with open(os.path.join(folder, "twisted", "plugins", "zzz_slow_plugin.py"), "w") as f:
            f.write(
                "import time\n"
                "from twisted.application.service import ServiceMaker\n"
                f"open({marker!r}, 'w').close()\n"
                "time.sleep(1.0)\n"
                "slow = ServiceMaker('zzz-slow', 'os', 'a slow plugin', 'zzz-slow')\n"
            )
        port = free_port()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, folder]))
        # With its dropin cache written, twistd imports each plugin module
        # while it looks for its subcommands, in path order: ours, then the
        # slow one, as on a machine where the caches are up to date.
        scan = "from twisted.plugin import IPlugin, getPlugins; import twisted.plugins; list(getPlugins(IPlugin))"
        subprocess.run([sys.executable, "-c", scan], env=env, check=True, timeout=60)
        os.remove(marker)
        proc = subprocess.Popen(
            twistd_command("--port", str(port)),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.addCleanup(lambda: (stop_group(proc), proc.communicate(timeout=30)))
        wait_for(lambda: os.path.exists(marker) or proc.poll() is not None, what="the slow plugin being imported")
        self.assertIsNone(proc.poll())
        proc.send_signal(signal.SIGHUP)
        try:
            wait_for_port(port, proc, timeout=30)
        except RuntimeError:
            self.fail(f"SIGHUP during plugin discovery killed twistd (exit {proc.returncode})")
        self.assertEqual(echo_once(port), b"ECHO ok\n")

    def test_started_under_nohup_no_sighup_ever_kills(self) -> None:
        """Under nohup (SIGHUP ignored from exec on), SIGHUPs from the first moment kill nothing."""
        folder, path = self.write_rules(sleep=0.0)
        port = free_port()
        proc = subprocess.Popen(
            ["nohup", *twistd_command("--port", str(port), "--config", path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.addCleanup(lambda: (stop_group(proc), proc.communicate(timeout=30)))
        # nohup's own first instructions, before it ignores SIGHUP and execs
        # twistd, are the only moment left: start once it has ignored it.
        wait_for(lambda: ignores_or_catches_sighup(proc.pid), timeout=10, what="nohup ignoring SIGHUP")
        deadline = time.monotonic() + 30.0
        sent = 0
        while time.monotonic() < deadline and proc.poll() is None and not listening(port):
            proc.send_signal(signal.SIGHUP)
            sent += 1
            time.sleep(0.01)
        self.assertIsNone(proc.poll(), f"killed by one of {sent} SIGHUPs sent from spawn on")
        self.assertGreater(sent, 5)
        self.assertEqual(echo_once(port), b"ECHO ok\n")
        wait_for(lambda: loads(folder) >= 2, what="the held SIGHUPs' reload")


class EarlyHoldTests(unittest.TestCase):
    """``_muxtwist_startup`` (run by the installed ``.pth`` hook) holds SIGHUP in ``twistd ... muxtwist`` only."""

    #: Read after ``muxtwist-startup.pth`` (.pth files are read in name
    #: order); with MUXTWIST_PROBE set it prints what the hook did and ends
    #: the process there, before any program runs.
    PROBE = (
        "import os, sys, json, _signal; m = sys.modules.get('_muxtwist_startup'); "
        "os.environ.get('MUXTWIST_PROBE') and (print(json.dumps(dict("
        "held=m is not None and _signal.getsignal(_signal.SIGHUP) is m._held, "
        "imported=m is not None, argv=sys.argv))), sys.stdout.flush(), os._exit(0))\n"
    )

    def site_venv(self) -> tuple[str, str]:
        """
        A fresh venv (no pip) with the hook in its site-packages as the wheel
        installs it, and the probe read after it; its python and a scratch directory.
        """
        scratch = os.path.abspath(self.mktemp())
        venv = os.path.join(scratch, "venv")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        site = os.path.join(venv, "lib", version, "site-packages")
        for name in ("muxtwist-startup.pth", "_muxtwist_startup.py"):
            shutil.copy(os.path.join(ROOT, name), site)
        with open(os.path.join(site, "zz-probe.pth"), "w") as f:
            f.write(self.PROBE)
        return os.path.join(venv, "bin", "python"), scratch

    def probe(self, python: str, args: list[str], cwd: str) -> dict[str, Any]:
        """What the hook did in ``python ARGS``, seen while site-packages is read."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env["MUXTWIST_PROBE"] = "1"
        done = subprocess.run([python, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, (args, done.stderr))
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def test_only_twistd_muxtwist_command_lines_hold(self) -> None:
        """
        Read from site-packages, the hook holds SIGHUP in ``twistd ...
        muxtwist`` and ``python -m twisted ... muxtwist`` whatever options the
        interpreter is given first (``-u``, ``-I``, ``-X dev``, a shebang's
        ``-sP``, ``-mtwisted``), and in no other command.
        """
        python, scratch = self.site_venv()
        twistd = os.path.join(scratch, "twistd")  # never runs: the probe ends the process first
        for command in (
            [twistd, "-n", "muxtwist", "--port", "3000"],
            [twistd, "--reactor=asyncio", "muxtwist"],
            ["-u", twistd, "-n", "muxtwist"],
            ["-I", "-X", "dev", twistd, "muxtwist", "--port", "3000"],
            ["-sP", twistd, "muxtwist"],
            ["-m", "twisted", "muxtwist"],
            ["-mtwisted", "muxtwist"],
            ["-W", "ignore", "-m", "twisted", "muxtwist"],
        ):
            self.assertTrue(self.probe(python, command, scratch)["held"], command)
        for command in (
            ["-m", "muxtwist", "check", "rules.py"],
            [twistd, "web", "--port", "8080"],
            ["muxtwist.py"],
            ["tool.py", "muxtwist"],
            ["tool.py", "-m", "twisted", "muxtwist"],
            ["-c", "pass", "muxtwist"],
            ["-m", "twisted.trial", "muxtwist"],
            ["-c", "pass"],
        ):
            self.assertFalse(self.probe(python, command, scratch)["held"], command)

    def test_never_holds_where_the_plugin_would_not_take_over(self) -> None:
        """
        Every command the hook holds SIGHUP in is one where the twistd plugin
        takes the hold over; anywhere else a SIGHUP would stay remembered and
        ignored for the life of the program.
        """
        import twisted

        plugin: Any = __import__("twisted.plugins.muxtwist_plugin", fromlist=["_running_muxtwist"])
        python, scratch = self.site_venv()
        twistd = os.path.join(scratch, "twistd")
        main = os.path.join(os.path.dirname(twisted.__file__), "__main__.py")
        for command in (
            [twistd, "-n", "muxtwist"],
            ["-u", twistd, "muxtwist"],
            ["-m", "twisted", "muxtwist"],
            ["-mtwisted", "muxtwist"],
            ["tool.py", "-m", "twisted", "muxtwist"],
        ):
            seen = self.probe(python, command, scratch)
            if not seen["held"]:
                continue
            # The command line as the plugin sees it (``-m`` becomes the module's file).
            self.patch(sys, "argv", [main if seen["argv"][0] == "-m" else seen["argv"][0], *seen["argv"][1:]])
            self.assertTrue(plugin._running_muxtwist(), command)

    #: Command lines (after ``twistd``) whose subcommand is ``muxtwist``,
    #: with options that take a value before it.
    SUBCOMMAND = (
        ["-l", "file", "muxtwist"],
        ["--logfile=x", "muxtwist"],
        ["-nl", "x", "muxtwist"],
        ["-lx", "muxtwist"],
        ["--reactor", "asyncio", "muxtwist"],
        ["--logf", "x", "muxtwist"],
        ["-n", "--", "muxtwist"],
    )
    #: Command lines naming ``muxtwist`` as an option's value or another
    #: subcommand's argument: none holds SIGHUP (it would stay held for good).
    NOT_SUBCOMMAND = (
        ["web", "--path", "muxtwist"],
        ["--logfile", "muxtwist", "web"],
        ["-l", "muxtwist", "web"],
        ["-nl", "muxtwist", "web"],
        ["--pidfile", "muxtwist", "web", "muxtwist"],
        ["--log", "x", "muxtwist"],
        ["--no-such-option", "muxtwist"],
    )

    def test_subcommand_not_an_option_value_holds(self) -> None:
        """
        Only ``muxtwist`` as twistd's (or twist's) subcommand holds SIGHUP,
        after options that take a value (``-l file``, ``-nl x``,
        ``--logfile=x``, ``--reactor asyncio``); ``muxtwist`` as an option's
        value or another command's argument does not, at start-up or in the plugin.
        """
        import twisted

        plugin: Any = __import__("twisted.plugins.muxtwist_plugin", fromlist=["_running_muxtwist"])
        main = os.path.join(os.path.dirname(twisted.__file__), "__main__.py")
        python, scratch = self.site_venv()
        twistd = os.path.join(scratch, "twistd")
        cases = [(args, True) for args in self.SUBCOMMAND] + [(args, False) for args in self.NOT_SUBCOMMAND]
        for args, wanted in cases:
            self.assertEqual(self.probe(python, [twistd, *args], scratch)["held"], wanted, args)
            self.patch(sys, "argv", ["/usr/bin/twistd", *args])
            self.assertEqual(plugin._running_muxtwist(), wanted, args)
        for args, wanted in (
            (["--log-file", "muxtwist", "web"], False),
            (["--reactor", "asyncio", "muxtwist"], True),
            (["--log-level=info", "muxtwist"], True),
        ):
            self.assertEqual(self.probe(python, ["-m", "twisted", *args], scratch)["held"], wanted, args)
            self.patch(sys, "argv", [main, *args])
            self.assertEqual(plugin._running_muxtwist(), wanted, args)

    def test_option_tables_are_twisteds(self) -> None:
        """The hook's tables of twistd's and twist's options are Twisted's own (this fails when Twisted changes)."""
        from twisted.application.twist._options import TwistOptions
        from twisted.scripts.twistd import ServerOptions

        import _muxtwist_startup

        for command, options in (("twistd", ServerOptions()), ("twist", TwistOptions())):
            longopts, shortopts = _muxtwist_startup.OPTIONS[command]
            self.assertEqual(sorted(longopts), sorted(options.longOpt), command)
            self.assertEqual(shortopts, options.shortOpt, command)

    def test_subcommand_is_the_word_getopt_leaves(self) -> None:
        """The hook's subcommand is the first word getopt leaves given twistd's options; none where getopt refuses."""
        import getopt

        from twisted.scripts.twistd import ServerOptions

        import _muxtwist_startup

        options = ServerOptions()
        for args in (*self.SUBCOMMAND, *self.NOT_SUBCOMMAND, ["-n"], ["-l"], ["--logfile"], ["-"], ["-b", "web"]):
            try:
                _, rest = getopt.getopt(args, options.shortOpt, options.longOpt)
                expected = rest[0] if rest else None
            except getopt.GetoptError:
                expected = None
            self.assertEqual(_muxtwist_startup.subcommand(list(args), "twistd"), expected, args)

    def test_other_programs_do_not_import_the_hook(self) -> None:
        """A program whose command line does not name muxtwist pays for one membership test, not an import."""
        python, scratch = self.site_venv()
        for command in (["-c", "pass"], ["-m", "pip", "--version"], [os.path.join(scratch, "tool.py"), "-v"]):
            self.assertFalse(self.probe(python, command, scratch)["imported"], command)

    def test_other_programs_keep_sighups_default(self) -> None:
        """Imported by any other program, the module leaves SIGHUP's default action alone."""
        done = subprocess.run(
            [sys.executable, "-c", "import signal, _muxtwist_startup; print(signal.getsignal(signal.SIGHUP))"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(done.stdout.strip(), str(signal.SIG_DFL), done.stderr)

    def test_signals_held_early_become_one_reload(self) -> None:
        """A SIGHUP held by the early handler is taken over by muxtwist's own hold and reported as pending once."""
        import _muxtwist_startup
        from muxtwist import _signals

        before = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, before)
        signal.signal(signal.SIGHUP, _muxtwist_startup._held)
        os.kill(os.getpid(), signal.SIGHUP)
        _signals.hold_sighup()
        self.assertIs(signal.getsignal(signal.SIGHUP), _signals._hold)
        self.assertTrue(_signals.take_pending_sighup())
        self.assertFalse(_signals.take_pending_sighup())

    #: Ends the program with status 3 and, once the interpreter has given
    #: the signal handlers back (it does, after atexit, before the process
    #: ends), sends it a SIGHUP: an object freed with ``__main__``'s globals.
    EXITING = textwrap.dedent(
        """\
        import os, signal, sys
        {hold}
        class SighupWhenFreed:
            def __del__(self, kill=os.kill, pid=os.getpid(), hup=signal.SIGHUP):
                kill(pid, hup)
        freed_last = SighupWhenFreed()
        sys.exit(3)
        """
    )

    def test_sighup_while_exiting_keeps_the_exit_status(self) -> None:
        """
        A SIGHUP while a process that holds SIGHUPs exits (a failed start, a
        finished stop) does not end it by the signal: its exit status stays its own.
        """
        script = os.path.join(os.path.abspath(self.mktemp()))
        with open(script, "w") as f:
            f.write(self.EXITING.format(hold="from muxtwist._signals import hold_sighup; hold_sighup()"))
        done = subprocess.run([sys.executable, script], cwd=ROOT, capture_output=True, timeout=60)
        self.assertEqual(done.returncode, 3, done.stderr)

    def test_sighup_while_exiting_before_the_plugin_keeps_the_exit_status(self) -> None:
        """The same with only the early hold in place (twistd muxtwist exiting before its plugin is imported)."""
        python, scratch = self.site_venv()
        twistd = os.path.join(scratch, "twistd")
        with open(twistd, "w") as f:
            f.write(self.EXITING.format(hold="assert 'muxtwist' not in sys.modules"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        done = subprocess.run([python, twistd, "muxtwist"], cwd=scratch, env=env, capture_output=True, timeout=60)
        self.assertEqual(done.returncode, 3, done.stderr)


def rss_kib(pid: int) -> int:
    """Resident memory of process ``pid`` in KiB (from /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class EchoBackpressureTests(unittest.TestCase):
    """The built-in echo service holds a bounded amount for a client that writes without reading."""

    def test_client_writing_without_reading_keeps_the_server_small(self) -> None:
        """A client writing 64 MiB to the default echo without reading stalls; the server grows by a few MiB only."""
        import hashlib

        port = free_port()
        server = Process(self, "--port", str(port))
        wait_for_port(port, server.proc, timeout=30)  # type: ignore[arg-type]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"ping\n")
            self.assertEqual(s.recv(100), b"ping\n")
            before = rss_kib(server.proc.pid)
            s.setblocking(False)
            block = os.urandom(1 << 20)
            total, sent = 64 << 20, 0
            digest = hashlib.sha256()
            last_progress = time.monotonic()
            deadline = time.monotonic() + 60
            while sent < total and time.monotonic() - last_progress < 2.0 and time.monotonic() < deadline:
                offset = sent % len(block)
                try:
                    n = s.send(block[offset:])
                except BlockingIOError:
                    time.sleep(0.01)
                    continue
                digest.update(block[offset : offset + n])
                sent += n
                last_progress = time.monotonic()
            grown = rss_kib(server.proc.pid) - before
            self.assertLess(sent, 32 << 20, "the client could send most of 64 MiB: nothing pushed back")
            self.assertLess(grown, 16 * 1024, f"the server grew by {grown} KiB")
            # Everything sent so far comes back, in order, once the client reads.
            s.setblocking(True)
            s.shutdown(socket.SHUT_WR)
            back = hashlib.sha256()
            received = 0
            while chunk := s.recv(1 << 20):
                back.update(chunk)
                received += len(chunk)
        self.assertEqual(received, sent)
        self.assertEqual(back.hexdigest(), digest.hexdigest())
        code, log = server.stop()
        self.assertEqual(code, 0, log)


class WorkersLogOptionsTests(unittest.SynchronousTestCase):
    """Where twistd was told to log, the workers of --workers log too."""

    def _pool(self, *twistd_args: str, json: bool = False) -> Any:
        from twisted.scripts.twistd import ServerOptions

        from muxtwist import tap
        from muxtwist._textlog import use_twistd_options

        self.addCleanup(use_twistd_options, {})
        config = ServerOptions()
        muxtwist_args = ["--workers", "2", "--port", "tcp:0", *(["--log-format", "json"] if json else [])]
        config.parseOptions(["-n", *twistd_args, "muxtwist", *muxtwist_args])
        return tap.makeService(config.subOptions)

    def test_syslog_given_to_twistd_is_the_workers_too(self) -> None:
        """`twistd --syslog --prefix P muxtwist --workers 2`: each worker gets --syslog --prefix=P."""
        pool = self._pool("--syslog", "--prefix", "edge")
        self.assertEqual(pool.twistd_args, ["--syslog", "--prefix=edge"])
        self.assertFalse(pool.relay_log)

    def test_a_logger_given_to_twistd_is_the_workers_too(self) -> None:
        """`twistd --logger X -l FILE muxtwist --workers 2`: each worker gets --logger=X, and no FILE to open."""
        pool = self._pool("--logger", "twisted.logger.textFileLogObserver", "-l", "unused.log")
        self.assertEqual(pool.twistd_args, ["--logger=twisted.logger.textFileLogObserver"])

    def test_a_logger_beside_syslog_wins_for_the_workers_as_for_twistd(self) -> None:
        """`twistd --syslog --logger X muxtwist --workers 2`: twistd logs to X, and so do the workers."""
        pool = self._pool("--syslog", "--logger", "twisted.logger.textFileLogObserver")
        self.assertEqual(pool.twistd_args, ["--logger=twisted.logger.textFileLogObserver"])

    def test_the_text_log_is_relayed_and_json_written_by_each_worker(self) -> None:
        """The text log goes through the parent; with --log-format json each worker writes its own, no FILE."""
        text = self._pool("-l", "unused.log")
        self.assertEqual((text.twistd_args, text.relay_log), ([], True))
        json = self._pool("-l", "unused.log", json=True)
        self.assertEqual((json.twistd_args, json.relay_log), ([], False))
        self.assertIn("json", json.worker_args)
