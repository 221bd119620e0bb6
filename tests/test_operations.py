"""
Operations end to end, with real processes: JSON logs and the admin
endpoint, running out of file descriptors, reload under load, worker
processes, systemd socket activation, and HAProxy in front of two instances.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from twisted.trial import unittest

from tests.processes import stop_group
from tests.twistd import ROOT, Twistd, free_port, twistd_command, wait_for_port

#: A rule set that answers with the worker's pid, the rules' version and the
#: client address the rules saw (the PROXY source when there is one).
ANSWER_RULES = """\
import os

from twisted.internet.protocol import Protocol
from zope.interface import implementer

from muxtwist import Rule
from muxtwist.admin import admin_site
from muxtwist.interfaces import IConnectionInfoFactory
from muxtwist.matchers import HTTP1, Any

VERSION = "{version}"


class Answer(Protocol):
    def __init__(self, source):
        self.source = source

    def dataReceived(self, data):
        self.transport.write(f"{{VERSION}} {{os.getpid()}} {{self.source}}\\n".encode())
        self.transport.loseConnection()


@implementer(IConnectionInfoFactory)
class AnswerFactory:
    def doStart(self):
        pass

    def doStop(self):
        pass

    def buildProtocol(self, addr):
        return Answer(addr.host)

    def buildProtocolForConnection(self, addr, info, rule_name):
        return Answer(info.source.host)


rules = [
    Rule(HTTP1(path="/metrics"), admin_site(), name="admin"),
    Rule(Any(), AnswerFactory(), name="answer"),
]
sniff_timeout = 2.0
shutdown_timeout = 5.0
{extra}
"""

ECHO_RULES = """\
from twisted.internet.protocol import Factory

from muxtwist import Rule
from muxtwist.admin import admin_site
from muxtwist.default import Echo
from muxtwist.matchers import HTTP1, Any

rules = [
    Rule(HTTP1(path="/metrics"), admin_site(), name="admin"),
    Rule(Any(), Factory.forProtocol(Echo), name="echo"),
]
shutdown_timeout = 5.0
"""


class Server(Twistd):
    """A ``Twistd`` whose output is read as it comes, so a busy server never blocks on a full pipe."""

    def __init__(self, *args: str, wait_ports: tuple[int, ...] = ()) -> None:
        super().__init__(*args)
        self.chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            for port in wait_ports:
                wait_for_port(port, None)
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}")
        except BaseException:
            self.kill()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):  # type: ignore[union-attr]
            self.chunks.append(chunk)

    @property
    def output(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def wait(self, timeout: float = 30.0) -> tuple[int, str]:
        """Wait for the process to exit (it has been told to stop); its exit code and output."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_group(self.proc)
        self._reader.join(10)
        return self.proc.returncode, self.output

    def stop(self, timeout: float = 30.0) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        stop_group(self.proc)
        self.wait()


def write_rules(path: str, text: str) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # a reload never sees a half-written file
    return os.path.abspath(path)  # twistd runs from the checkout, the tests from a scratch directory


def ask(port: int, data: bytes = b"hi\n", source: str | None = None, timeout: float = 5.0) -> bytes:
    """Connect, send, and read until the server closes."""
    with socket.socket() as s:
        s.settimeout(timeout)
        if source is not None:
            s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def json_events(output: str) -> list[dict[str, object]]:
    events = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return events


class LogsAndAdminTests(unittest.TestCase):
    """--log-format json, --admin with /metrics and /ready, readable text logs by default."""

    def test_json_logs_and_admin(self) -> None:
        """Each connection ends in one JSON event; /ready turns 503 while draining; SIGTERM exits 0."""
        rules = write_rules(self.mktemp(), ECHO_RULES)
        port, admin = free_port(), free_port()
        server = Server(
            "--config",
            rules,
            "--port",
            f"tcp:{port}:interface=127.0.0.1",
            "--admin",
            f"tcp:{admin}:interface=127.0.0.1",
            "--log-format",
            "json",
            wait_ports=(port, admin),
        )
        self.addCleanup(server.kill)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"hello")
            self.assertEqual(s.recv(100), b"hello")
        self.assertEqual(http_get(admin, "/ready"), (200, "ready\n"))
        code, text = http_get(admin, "/metrics")
        self.assertEqual(code, 200)
        self.assertIn('muxtwist_connections_total{outcome="handed_off",rule="echo"} 1.0', text)
        held = socket.create_connection(("127.0.0.1", port), timeout=5)
        held.sendall(b"x")
        self.assertEqual(held.recv(10), b"x")
        server.signal(signal.SIGTERM)
        until(lambda: http_get(admin, "/ready")[0] == 503, 10, "/ready to say 503 while draining")
        held.close()
        code, out = server.wait()  # already told to stop: no second signal
        self.assertEqual(code, 0, out[-3000:])
        ends = [e for e in json_events(out) if e.get("log_event") == "connection_end"]
        echo = [e for e in ends if e["rule"] == "echo"]
        self.assertEqual(len(echo), 2, ends)
        first = echo[0]
        self.assertEqual(first["outcome"], "handed_off")
        self.assertEqual(first["local_port"], port)
        self.assertTrue(str(first["peer"]).startswith("127.0.0.1:"))
        self.assertEqual(first["bytes_in"], 5)
        for field in ("sniff_time", "duration", "bytes_out"):
            self.assertIn(field, first)

    def test_text_logs_by_default(self) -> None:
        """Without --log-format the end event is one readable line."""
        rules = write_rules(self.mktemp(), ECHO_RULES)
        port = free_port()
        server = Server("--config", rules, "--port", f"tcp:{port}:interface=127.0.0.1", wait_ports=(port,))
        self.addCleanup(server.kill)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"hello")
            self.assertEqual(s.recv(100), b"hello")
        code, out = server.stop()
        self.assertEqual(code, 0, out)
        self.assertRegex(out, r"connection 127\.0\.0\.1:\d+ -> port \d+ ended: handed_off, rule echo")
        self.assertNotIn('"log_event"', out)


class EmfileTests(unittest.TestCase):
    """Out of file descriptors: refused clients are closed and counted, and serving resumes."""

    def test_emfile(self) -> None:
        """With RLIMIT_NOFILE lowered, clients past the limit are closed at once; freed fds serve again."""
        rules = write_rules(self.mktemp(), ECHO_RULES)
        port = free_port()
        limit = 96

        def lower_limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        proc = subprocess.Popen(
            twistd_command("--config", rules, "--port", f"tcp:{port}:interface=127.0.0.1"),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=lower_limit,
            start_new_session=True,
        )
        self.addCleanup(lambda: (stop_group(proc), proc.communicate()))
        wait_for_port(port, proc)
        held: list[socket.socket] = []
        refused = 0
        self.addCleanup(lambda: [s.close() for s in held])
        for _ in range(limit + 40):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                s.sendall(b"x")
                answer = s.recv(10)
            except (ConnectionResetError, BrokenPipeError):
                answer = b""
            if answer == b"x":
                held.append(s)
            else:
                refused += 1
                s.close()
                if refused >= 3:
                    break
        self.assertGreaterEqual(refused, 3, "the server never ran out of descriptors")
        self.assertGreater(len(held), 50)
        for s in held:
            s.close()
        held.clear()

        def served() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    s.sendall(b"y")
                    return s.recv(10) == b"y"
            except OSError:
                return False

        until(served, 10, "serving again after descriptors were freed")
        code, text = http_get(port, "/metrics")
        self.assertEqual(code, 200)
        [line] = [x for x in text.splitlines() if x.startswith('muxtwist_limit_rejections_total{limit="emfile"}')]
        self.assertGreaterEqual(float(line.split()[-1]), refused)
        self.assertIsNone(proc.poll())
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        self.assertEqual(proc.returncode, 0, out[-2000:])


class ReloadUnderLoadTests(unittest.TestCase):
    """SIGHUP several times while clients keep connecting: none fails."""

    def test_reload_under_load(self) -> None:
        """Four client threads, five reloads alternating two rules files: zero failed connections."""
        path = os.path.abspath(self.mktemp())
        write_rules(path, ANSWER_RULES.format(version="v1", extra=""))
        port = free_port()
        server = Server("--config", path, "--port", f"tcp:{port}:interface=127.0.0.1", wait_ports=(port,))
        self.addCleanup(server.kill)
        stop = threading.Event()
        failures: list[str] = []
        answers: dict[str, int] = {}
        lock = threading.Lock()

        def client() -> None:
            deadline = time.monotonic() + 20
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    got = ask(port, b"hi\n", timeout=5).decode()
                    version = got.split()[0] if got else ""
                    if version not in ("v1", "v2"):
                        raise ValueError(f"bad answer {got!r}")
                    with lock:
                        answers[version] = answers.get(version, 0) + 1
                except Exception as e:
                    with lock:
                        failures.append(repr(e))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            for i in range(5):
                time.sleep(0.3)  # let load run between reloads
                write_rules(path, ANSWER_RULES.format(version="v2" if i % 2 == 0 else "v1", extra=""))
                server.signal(signal.SIGHUP)
                # Each its own reload: SIGHUPs that come while one reload still
                # waits are that reload, as a busy host would make of them.
                deadline = time.monotonic() + 10
                while server.output.count("reloaded ") <= i and time.monotonic() < deadline:
                    time.sleep(0.02)
            time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        code, out = server.stop()
        self.assertEqual(failures, [])
        self.assertGreater(sum(answers.values()), 100, answers)
        self.assertGreater(answers.get("v2", 0), 0, answers)
        self.assertEqual(out.count("reloaded "), 5, out[-3000:])
        self.assertEqual(code, 0)


class WorkersTests(unittest.TestCase):
    """--workers 2: both serve, reload and stop reach both, a dead worker comes back."""

    def test_workers(self) -> None:
        """Connections reach two worker pids; SIGHUP reloads both; SIGKILLed worker is replaced; SIGTERM exits 0."""
        path = os.path.abspath(self.mktemp())
        write_rules(path, ANSWER_RULES.format(version="v1", extra=""))
        port = free_port()
        server = Server(
            "--config", path, "--port", f"tcp:{port}:interface=127.0.0.1", "--workers", "2", wait_ports=(port,)
        )
        self.addCleanup(server.kill)

        def pids_answering(version: str, want: int, timeout: float) -> set[int]:
            seen: set[int] = set()

            def enough() -> bool:
                # Several clients at once, so that both workers are woken.
                socks = []
                for _ in range(8):
                    s = socket.create_connection(("127.0.0.1", port), timeout=5)
                    socks.append(s)
                for s in socks:
                    s.sendall(b"hi\n")
                for s in socks:
                    answer = s.recv(100).split()
                    s.close()
                    if answer and answer[0].decode() == version:
                        seen.add(int(answer[1]))
                return len(seen) >= want

            until(enough, timeout, f"{want} workers answering {version}")
            return seen

        first = pids_answering("v1", 2, 20)
        self.assertNotIn(server.proc.pid, first)
        write_rules(path, ANSWER_RULES.format(version="v2", extra=""))
        server.signal(signal.SIGHUP)
        self.assertEqual(pids_answering("v2", 2, 20), first)
        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        after = pids_answering("v2", 2, 30)
        self.assertNotIn(victim, after)
        code, out = server.stop()
        self.assertEqual(code, 0, out[-3000:])
        for pid in after:
            with self.assertRaises(ProcessLookupError):
                os.kill(pid, 0)


class SystemdTests(unittest.TestCase):
    """systemd: endpoints adopt a socket passed as fd 3 with LISTEN_FDS/LISTEN_PID."""

    def test_socket_activation(self) -> None:
        """A socket made by the test and passed as fd 3 is served through --port systemd:domain=INET:name=muxtwist."""
        rules = write_rules(self.mktemp(), ECHO_RULES)
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        port = listening.getsockname()[1]
        command = twistd_command("--config", rules, "--port", "systemd:domain=INET:name=muxtwist")
        wrapper = textwrap.dedent(
            """
            import os, sys
            fd = int(sys.argv[1])
            if fd != 3:
                os.dup2(fd, 3)
                os.close(fd)
            os.set_inheritable(3, True)
            os.environ["LISTEN_FDS"] = "1"
            os.environ["LISTEN_PID"] = str(os.getpid())
            os.environ["LISTEN_FDNAMES"] = "muxtwist"  # systemd 227+ names them; Twisted wants both
            os.execv(sys.argv[2], sys.argv[2:])
            """
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", wrapper, str(listening.fileno()), *command],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=(listening.fileno(),),
            start_new_session=True,
        )
        self.addCleanup(lambda: (stop_group(proc), proc.communicate()))
        listening.close()  # only the child holds it now

        def served() -> bool:
            if proc.poll() is not None:
                raise AssertionError(proc.communicate()[0].decode(errors="replace"))
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    s.sendall(b"ping")
                    return s.recv(10) == b"ping"
            except OSError:
                return False

        until(served, 20, "the systemd socket to be served")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        self.assertEqual(proc.returncode, 0, out.decode(errors="replace")[-2000:])


HAPROXY = """\
global
    maxconn 200
defaults
    mode tcp
    timeout connect 1s
    timeout client 10s
    timeout server 10s
    retries 3
    option redispatch 1
frontend front
    bind 127.0.0.1:{front}
    default_backend muxtwist
backend muxtwist
    balance roundrobin
    option httpchk GET /ready
    http-check expect status 200
    server m1 127.0.0.1:{port1} send-proxy-v2 check port {admin1} inter 200ms fall 2 rise 1
    server m2 127.0.0.1:{port2} send-proxy-v2 check port {admin2} inter 200ms fall 2 rise 1
"""


class LoadBalancerTests(unittest.TestCase):
    """Real HAProxy with PROXY v2 and health checks on /ready in front of two instances."""

    def test_haproxy(self) -> None:
        """Both instances serve and see the client's real address; killing one mid-traffic fails no client."""
        rules = write_rules(
            self.mktemp(), ANSWER_RULES.format(version="v1", extra='accept_proxy_protocol = ["127.0.0.1/32"]')
        )
        ports = [free_port() for _ in range(5)]
        front, port1, admin1, port2, admin2 = ports
        servers = []
        for port, admin in ((port1, admin1), (port2, admin2)):
            server = Server(
                "--config",
                rules,
                "--port",
                f"tcp:{port}:interface=127.0.0.1",
                "--admin",
                f"tcp:{admin}:interface=127.0.0.1",
                "--log-format",
                "json",
                wait_ports=(admin,),
            )
            self.addCleanup(server.kill)
            servers.append(server)
        config = self.mktemp() + ".cfg"
        with open(config, "w") as f:
            f.write(HAPROXY.format(front=front, port1=port1, admin1=admin1, port2=port2, admin2=admin2))
        haproxy = subprocess.Popen(
            ["haproxy", "-db", "-f", config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.addCleanup(lambda: (stop_group(haproxy), haproxy.communicate()))
        wait_for_port(front, None)
        # 127.0.0.2 is loopback too; HAProxy itself connects from 127.0.0.1.
        client = "127.0.0.2"
        pids: set[int] = set()
        failures: list[str] = []

        def round_of(n: int) -> None:
            for _ in range(n):
                try:
                    version, pid, source = ask(front, b"hi\n", source=client, timeout=5).decode().split()
                    pids.add(int(pid))
                    if source != client:
                        failures.append(f"rules saw {source}")
                except Exception as e:
                    failures.append(repr(e))

        until(lambda: (round_of(4), len(pids) == 2)[1], 15, "both instances to answer through HAProxy")
        self.assertEqual(failures, [])
        victim = servers[0]
        survivor_pid = servers[1].proc.pid
        round_of(20)
        victim.kill()
        pids.clear()
        round_of(60)
        self.assertEqual(failures, [])
        self.assertEqual(pids, {survivor_pid})
        code, out = servers[1].stop()
        self.assertEqual(code, 0)
        ends = [e for e in json_events(out) if e.get("log_event") == "connection_end" and e.get("rule") == "answer"]
        self.assertGreater(len(ends), 60)
        self.assertTrue(all(str(e["peer"]).startswith(client + ":") for e in ends), ends[:3])


class DefaultPageTests(unittest.TestCase):
    """The built-in demo (no --config) shows a stranger nothing but rule names and counts."""

    def test_default_page_shows_no_pid_paths_or_versions(self) -> None:
        """The demo page and its JSON show rules and counts but no PID, socket path or version, in body or headers."""
        import twisted
        from muxtwist._version import __version__
        from tests.test_admin_page import twistd as start_twistd
        from tests.test_admin_page import wait_for_port as wait_until_listening

        tmp = tempfile.mkdtemp(prefix="muxtwist-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        unix_path = os.path.join(tmp, "demo.sock")
        port = free_port()
        server = start_twistd(tmp, "--port", f"tcp:{port}:interface=127.0.0.1", "--port", f"unix:{unix_path}")
        self.addCleanup(server.kill)
        wait_until_listening(port, server.proc)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            client.sendall(b"hello\n")
            client.shutdown(socket.SHUT_WR)
            self.assertEqual(client.recv(100), b"hello\n")

        def curl(*args: str) -> str:
            out = subprocess.run(["curl", "-sS", "-i", "--max-time", "10", *args], capture_output=True, check=True)
            return out.stdout.decode()

        page = curl(f"http://127.0.0.1:{port}/")
        data = curl(f"http://127.0.0.1:{port}/status.json")
        over_unix = curl("--unix-socket", unix_path, "http://demo/")
        for shown in (page, data, over_unix):
            self.assertIn("status-page", shown)
            self.assertIn("echo", shown)
            self.assertNotIn(str(server.proc.pid), shown)
            self.assertNotIn(tmp, shown)
            self.assertNotIn(__version__, shown)
            self.assertNotIn(twisted.__version__, shown)
            self.assertNotIn("TwistedWeb", shown)
        body = json.loads(data.split("\r\n\r\n", 1)[1])
        self.assertNotIn("pid", body)
        self.assertNotIn("version", body)
        self.assertEqual(sorted(listener["endpoint"] for listener in body["listeners"]), ["listener", f"port {port}"])
        (tcp,) = [listener for listener in body["listeners"] if listener["endpoint"] == f"port {port}"]
        echo = next(r for r in tcp["rules"] if r["name"] == "echo")
        self.assertEqual(echo["total"], 1)
        server.proc.send_signal(signal.SIGTERM)
        self.assertEqual(server.wait(30), 0, server.output[-3000:])

    def test_error_answers_of_the_default_page_name_no_version(self) -> None:
        """POST, OPTIONS or an unknown method to the demo page get error answers that do not name Twisted's version."""
        from twisted.internet import reactor
        from twisted.internet.utils import getProcessOutputAndValue
        from twisted.web.server import Site

        from muxtwist.default import StatusPage
        from muxtwist.service import MuxService

        port = reactor.listenTCP(0, Site(StatusPage(MuxService())), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/x"

        async def run() -> None:
            for method in ("POST", "OPTIONS", "BREW", "GET"):
                out, err, code = await getProcessOutputAndValue(
                    "curl", ["-sS", "-i", "--max-time", "10", "-X", method, url], env=os.environ
                )
                self.assertEqual(code, 0, err)
                head = out.decode().split("\r\n\r\n", 1)[0]
                self.assertIn("\r\nServer: muxtwist", head, (method, head))
                self.assertNotIn("Twisted", out.decode(), method)

        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(run())  # type: ignore[return-value]
