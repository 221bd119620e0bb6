"""
Every example in ``examples/`` started as a real process on 127.0.0.1 and
checked with real clients (curl, nc, Python sockets), then stopped with
SIGTERM, which must end it with exit status 0.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence

from twisted.trial.unittest import TestCase

from tests.certs import make_ca, make_certificate
from tests.processes import stop_group
from tests.test_proxy_real import start_nginx, start_redis, start_sshd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "muxtwist"]
STARTUP = 20.0
CLIENT = 10.0


def free_port() -> int:
    """A port nothing listens on right now (for files that name their ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Running:
    """A started example process whose output is read as it comes."""

    def __init__(
        self,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        cwd: str = ROOT,
    ) -> None:
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            [ROOT, *([env.pop("PYTHONPATH")] if env and "PYTHONPATH" in env else [])]
        )
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        # Its own process group, so that kill() stops its children too (nginx's workers, twistd's).
        self.process = subprocess.Popen(
            list(args),
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=pass_fds,
            start_new_session=True,
        )
        self.output = b""

    def _read(self, deadline: float) -> bool:
        """Read what is there, waiting until ``deadline`` at most; False at end of output."""
        assert self.process.stdout is not None
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        ready, _, _ = select.select([self.process.stdout], [], [], left)
        if ready:
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                return False
            self.output += chunk
        return True

    def wait_for(self, pattern: bytes, timeout: float = STARTUP, count: int = 1) -> list[re.Match[bytes]]:
        """Wait until ``pattern`` has appeared ``count`` times in the output."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = list(re.finditer(pattern, self.output))
            if len(found) >= count:
                return found
            if not self._read(deadline):
                break
        raise AssertionError(f"{pattern!r} not seen in time; output:\n{self.output.decode(errors='replace')}")

    def listening_ports(self, count: int = 1, kind: bytes = rb"SniffingFactory") -> list[int]:
        """The ports of the first ``count`` listeners of this kind, from the log."""
        return [int(m.group(1)) for m in self.wait_for(kind + rb" starting on (\d+)", count=count)[:count]]

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then the exit status (killed and failed if it takes longer than ``timeout``)."""
        self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self._read(deadline) and time.monotonic() < deadline:
            pass
        try:
            return self.process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("did not stop on SIGTERM in time") from None

    def kill(self) -> None:
        """Stop the process and everything it started: its process group, TERM, then KILL after 5 s."""
        stop_group(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()


def curl(port: int, path: str = "/", *headers: str) -> str:
    """The body curl gets (and a failed test if curl fails)."""
    args = ["curl", "-sS", "--fail", "--max-time", str(CLIENT)]
    for h in headers:
        args += ["-H", h]
    done = subprocess.run([*args, f"http://127.0.0.1:{port}{path}"], capture_output=True, timeout=CLIENT + 5)
    assert done.returncode == 0, f"curl failed ({done.returncode}): {done.stderr!r}"
    return done.stdout.decode()


def nc(port: int, data: bytes, *, half_close: bool = True) -> bytes:
    """
    What ``nc`` gets back after sending ``data``: with ``half_close``, ``nc -N``
    shuts down its sending side after ``data``; without, it reads until the
    server closes.
    """
    done = subprocess.run(
        ["nc", *(["-N"] if half_close else []), "-w", str(int(CLIENT)), "127.0.0.1", str(port)],
        input=data,
        capture_output=True,
        timeout=CLIENT + 5,
    )
    return done.stdout


def read_until(s: socket.socket, marker: bytes, timeout: float = CLIENT) -> bytes:
    """Read from ``s`` until ``marker`` appears or the peer closes, within ``timeout``."""
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    data = b""
    while marker not in data and time.monotonic() < deadline:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def read_all(s: socket.socket, timeout: float = CLIENT) -> bytes:
    """Read from ``s`` until the peer closes (or resets: an abort), within ``timeout``."""
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"connection not closed in time; got {data!r}")


def dribble(port: int, data: bytes) -> bytes:
    """Send ``data`` one byte per segment, then half-close and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            s.sendall(data[i : i + 1])
        s.shutdown(socket.SHUT_WR)
        return read_all(s)


class ExampleTestCase(TestCase):
    def start(self, args: Sequence[str], env: dict[str, str] | None = None, cwd: str = ROOT) -> Running:
        running = Running(args, env, cwd=cwd)
        self.addCleanup(running.kill)
        return running

    def assertStops(self, running: Running, *, twistd: bool = True) -> None:
        """SIGTERM stops the process cleanly, with exit status 0."""
        code = running.stop()
        log = running.output.decode(errors="replace")
        self.assertEqual(code, 0, log)
        if twistd:
            self.assertIn("Server Shut Down.", log)
        self.assertNotIn("Traceback", log)


class TutorialTests(ExampleTestCase):
    """The tutorial: the built-in default, the embedded script, and twistd with a rules file."""

    def test_builtin_default(self) -> None:
        """With no --config, HTTP gets the status page and anything else is echoed."""
        running = self.start([*TWISTD, "--port", "tcp:0:interface=127.0.0.1"])
        (port,) = running.listening_ports()
        self.assertIn("muxtwist", curl(port))
        self.assertIn('"listeners"', curl(port, "/status.json"))
        self.assertEqual(nc(port, b"hello\n"), b"hello\n")
        self.assertStops(running)

    def test_embedded(self) -> None:
        """two_protocols.py serves HTTP and echo on one port."""
        running = self.start([sys.executable, "examples/two_protocols.py", "tcp:0:interface=127.0.0.1"])
        (port,) = running.listening_ports()
        self.assertEqual(curl(port), "hello from HTTP\n")
        self.assertEqual(nc(port, b"hello\n"), b"hello\n")
        self.assertStops(running, twistd=False)

    def test_twistd_rules(self) -> None:
        """The tutorial's rules.py under twistd serves the same two protocols."""
        running = self.start([*TWISTD, "--port", "tcp:0:interface=127.0.0.1", "--config", "examples/rules.py"])
        (port,) = running.listening_ports()
        self.assertEqual(curl(port), "hello from HTTP\n")
        self.assertEqual(nc(port, b"hello\n"), b"hello\n")
        self.assertStops(running)


class MultiportTests(ExampleTestCase):
    """examples/multiport: one process, two ports, each with its own rules."""

    def test_two_ports(self) -> None:
        """Each port serves its own rules; the admin port closes non-HTTP clients."""
        public, admin = free_port(), free_port()
        running = self.start(
            [*TWISTD, "--config", "examples/multiport/rules.py"],
            {"PUBLIC_PORT": str(public), "ADMIN_PORT": str(admin)},
        )
        self.assertEqual(sorted(running.listening_ports(2)), sorted([public, admin]))
        self.assertEqual(curl(public), "public site\n")
        self.assertEqual(nc(public, b"ping\n"), b"ping\n")
        self.assertEqual(curl(admin), "admin console\n")
        self.assertEqual(nc(admin, b"ping\n"), b"")
        self.assertStops(running)


class SupervisedTests(ExampleTestCase):
    """examples/supervised.py: a MuxService and another server in one MultiService."""

    def test_graceful_stop(self) -> None:
        """SIGTERM lets a request in flight finish, aborts an idle echo client at shutdown_timeout, and exits 0."""
        running = self.start(
            [sys.executable, "examples/supervised.py", "tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"]
        )
        (public,) = running.listening_ports()
        (admin,) = running.listening_ports(kind=rb"Site")
        self.assertEqual(curl(public), "public site\n")
        self.assertEqual(curl(admin), "admin console\n")

        idle = socket.create_connection(("127.0.0.1", public), timeout=CLIENT)
        self.addCleanup(idle.close)
        idle.sendall(b"still here\n")
        self.assertEqual(read_until(idle, b"\n"), b"still here\n")

        slow = subprocess.Popen(
            ["curl", "-sS", "--fail", "--max-time", str(CLIENT), f"http://127.0.0.1:{public}/slow"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(lambda: slow.poll() is None and slow.kill())
        running.wait_for(rb"slow request started")
        started = time.monotonic()
        code = running.stop()
        elapsed = time.monotonic() - started
        out, err = slow.communicate(timeout=CLIENT)
        self.assertEqual((slow.returncode, out), (0, b"slow response begins...\n...and ends\n"), err)
        self.assertEqual(read_all(idle), b"")
        self.assertEqual(code, 0, running.output.decode(errors="replace"))
        # shutdown_timeout is 3 s: the idle echo connection holds the stop until then, not longer.
        self.assertGreater(elapsed, 2.5)
        self.assertLess(elapsed, 10.0)
        self.assertIn(b"all services stopped", running.output)


class GreeterTests(ExampleTestCase):
    """examples/greeter: a server-speaks-first protocol behind on_timeout, next to HTTP."""

    def test_greeter_and_http(self) -> None:
        """HTTP gets the page at once; a silent client gets the greeting after sniff_timeout and can talk."""
        running = self.start([*TWISTD, "--port", "tcp:0:interface=127.0.0.1", "--config", "examples/greeter/rules.py"])
        (port,) = running.listening_ports()
        self.assertEqual(curl(port), "web page\n")
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT) as s:
            started = time.monotonic()
            greeting = read_until(s, b"\r\n")
            waited = time.monotonic() - started
            self.assertEqual(greeting, b"220 mail.example.test ESMTP muxtwist example\r\n")
            self.assertGreater(waited, 0.4)
            self.assertLess(waited, 3.0)
            s.sendall(b"EHLO client.test\r\n")
            self.assertEqual(read_until(s, b"\r\n"), b"250 mail.example.test\r\n")
            s.sendall(b"QUIT\r\n")
            self.assertEqual(read_all(s), b"221 Bye\r\n")
        self.assertStops(running)


class MatcherPluginTests(ExampleTestCase):
    """examples/matcher_plugin: a third-party matcher found by name, and its trial tests."""

    def plugin_env(self) -> dict[str, str]:
        return {"PYTHONPATH": os.path.join(EXAMPLES, "matcher_plugin")}

    def test_plugin_found_by_name(self) -> None:
        """muxtwist.matchers.plugin('memcached') finds the module in examples/matcher_plugin/twisted/plugins."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(EXAMPLES, "matcher_plugin"), ROOT]))
        code = "from muxtwist.matchers import plugin; print(type(plugin('memcached')).__module__)"
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, timeout=60)
        self.assertEqual(done.stdout.strip(), b"acme_matchers", done.stderr)

    def test_served(self) -> None:
        """Under twistd, a memcached client reaches the cache and HTTP the web page."""
        running = self.start(
            [*TWISTD, "--port", "tcp:0:interface=127.0.0.1", "--config", "examples/matcher_plugin/rules.py"],
            self.plugin_env(),
        )
        (port,) = running.listening_ports()
        self.assertEqual(curl(port), "web page\n")
        self.assertEqual(nc(port, b"version\r\nquit\r\n", half_close=False), b"VERSION 1.6.0-acme\r\n")
        self.assertEqual(dribble(port, b"get key\r\nquit\r\n"), b"END\r\n")
        self.assertStops(running)

    def test_example_trial_tests(self) -> None:
        """The example's own trial tests pass."""
        folder = os.path.join(EXAMPLES, "matcher_plugin")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([folder, ROOT]))
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(
                [sys.executable, "-m", "twisted.trial", "--temp-directory", os.path.join(tmp, "trial"), "test_rules"],
                env=env,
                cwd=folder,
                capture_output=True,
                timeout=120,
            )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn(b"PASSED (successes=8)", done.stdout)


class FourServicesTests(ExampleTestCase):
    """examples/four_services: the two sites by Host, ECHO, and the greeter on one port."""

    def setUp(self) -> None:
        self.running = self.start(
            [*TWISTD, "--port", "tcp:0:interface=127.0.0.1", "--config", "examples/four_services/rules.py"]
        )
        (self.port,) = self.running.listening_ports()

    def test_every_service(self) -> None:
        """curl with and without Host: a.test, nc with ECHO, and a silent client each reach their service."""
        port = self.port
        for _ in range(3):
            self.assertEqual(curl(port, "/", "Host: a.test"), "this is a.test\n")
            self.assertEqual(curl(port, "/", "Host: A.Test:3000"), "this is a.test\n")
            self.assertEqual(curl(port), "some other host\n")
            self.assertEqual(nc(port, b"ECHO hello\n"), b"ECHO hello\n")
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT) as s:
            started = time.monotonic()
            greeting = read_until(s, b"\r\n")
            waited = time.monotonic() - started
            self.assertEqual(greeting, b"220 hello, silent client\r\n")
            # sniff_timeout is 0.5 s: the greeting comes right after it.
            self.assertGreater(waited, 0.4)
            self.assertLess(waited, 2.0)
        self.assertStops(self.running)

    def test_one_byte_at_a_time(self) -> None:
        """Clients that send one byte per segment reach the same services."""
        port = self.port
        a = dribble(port, b"GET / HTTP/1.0\r\nHost: a.test\r\n\r\n")
        self.assertTrue(a.startswith(b"HTTP/1.0 200") and a.endswith(b"\r\n\r\nthis is a.test\n"), a)
        other = dribble(port, b"GET / HTTP/1.0\r\nHost: b.test\r\n\r\n")
        self.assertTrue(other.endswith(b"\r\n\r\nsome other host\n"), other)
        self.assertEqual(dribble(port, b"ECHO one byte at a time\n"), b"ECHO one byte at a time\n")
        self.assertStops(self.running)


def run_client(args: Sequence[str], timeout: float = CLIENT) -> subprocess.CompletedProcess[bytes]:
    """Run a client program to the end, within ``timeout``."""
    return subprocess.run(list(args), capture_output=True, timeout=timeout + 5)


def wait_port(port: int, timeout: float = STARTUP) -> None:
    """Wait until something accepts connections on loopback ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"nothing listens on port {port} after {timeout}s")


class GrpcAndHttpTests(ExampleTestCase):
    """examples/grpc_and_http: gRPC and HTTP/1.1 on one port in one process (the cmux pattern)."""

    def test_grpcio_and_curl(self) -> None:
        """A grpcio client gets its unary answer and curl the web page, on the same port, twice over."""
        import grpc

        running = self.start(
            [*TWISTD, "--port", "tcp:0:interface=127.0.0.1", "--config", "examples/grpc_and_http/rules.py"]
        )
        (port,) = running.listening_ports()
        for word in (b"world", b"again"):
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_retries", 0)]) as channel:
                reply = channel.unary_unary("/demo.Greeter/Hello")(word, timeout=CLIENT)
            self.assertEqual(reply, b"hello " + word)
            self.assertEqual(curl(port), "hello from HTTP\n")
        running.wait_for(rb"ended: handed_off, rule grpc", count=2)
        self.assertStops(running)


class PortReuseTests(ExampleTestCase):
    """examples/port_reuse: real nginx, redis-server and sshd behind one muxtwist port."""

    async def test_curl_redis_cli_and_ssh_keyscan(self) -> None:
        """curl reaches nginx, redis-cli reaches redis-server, ssh-keyscan gets sshd's host key."""
        nginx = await start_nginx(self, "hello from nginx")
        redis = await start_redis(self)
        sshd, host_key = await start_sshd(self)
        running = self.start(
            [*TWISTD, "--port", "tcp:0:interface=127.0.0.1", "--config", "examples/port_reuse/rules.py"],
            {"NGINX_PORT": str(nginx), "REDIS_PORT": str(redis), "SSHD_PORT": str(sshd)},
        )
        (port,) = running.listening_ports()
        self.assertEqual(curl(port), "hello from nginx")
        done = run_client(["redis-cli", "-p", str(port), "SET", "muxtwist", "one port"])
        self.assertEqual((done.returncode, done.stdout), (0, b"OK\n"), done.stderr)
        done = run_client(["redis-cli", "-p", str(port), "GET", "muxtwist"])
        self.assertEqual(done.stdout, b"one port\n", done.stderr)
        done = run_client(["ssh-keyscan", "-T", str(int(CLIENT)), "-t", "ed25519", "-p", str(port), "127.0.0.1"])
        self.assertIn(host_key.encode(), done.stdout, done.stderr)
        # ssh-keyscan waits for the server's banner: it reached sshd through on_timeout.
        running.wait_for(rb"ended: timeout, rule on_timeout")
        # The OpenSSH client speaks first, so the SSH() rule takes it to sshd, which asks for a key it lacks.
        done = run_client(
            [
                *("ssh", "-p", str(port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"),
                *("-o", "UserKnownHostsFile=/dev/null", "-o", f"ConnectTimeout={int(CLIENT)}"),
                *("-o", "PreferredAuthentications=publickey", "nobody@127.0.0.1", "true"),
            ]
        )
        self.assertIn(b"Permission denied (publickey", done.stderr)
        for rule in (b"web", b"redis", b"ssh"):
            running.wait_for(rb"ended: handed_off, rule " + rule)
        self.assertStops(running)


class TLSSitesTests(ExampleTestCase):
    """examples/tls_sites: two certificates, HTTP/2 and HTTP/1.1, and the redirect, on one port."""

    def test_curl(self) -> None:
        """curl gets each host's certificate over h2 or HTTP/1.1; plain HTTP gets a 301 to https."""
        ca = make_ca()
        folder = tempfile.mkdtemp(prefix="muxtwist-example-")
        self.addCleanup(shutil.rmtree, folder, True)
        certificates = os.path.join(folder, "certs")
        os.mkdir(certificates)
        for host in ("a.test", "b.test"):
            pair = make_certificate(host, ca=ca)
            with open(os.path.join(certificates, host + ".pem"), "wb") as f:
                f.write(pair.cert_pem + pair.key_pem)
        ca_path = os.path.join(folder, "ca.pem")
        with open(ca_path, "wb") as f:
            f.write(ca.cert_pem)
        port = free_port()
        running = self.start(
            [*TWISTD, "--port", f"tcp:{port}:interface=127.0.0.1", "--config", "examples/tls_sites/rules.py"],
            {"CERT_DIR": certificates, "PUBLIC_PORT": str(port)},
        )
        running.listening_ports()

        def https(host: str, version: str) -> tuple[str, str]:
            done = run_client(
                [
                    *("curl", "-sS", "--fail", "--max-time", str(CLIENT), "--cacert", ca_path, version),
                    *("--resolve", f"{host}:{port}:127.0.0.1", "-w", "|%{http_version}"),
                    f"https://{host}:{port}/",
                ]
            )
            self.assertEqual(done.returncode, 0, done.stderr)
            body, _, http_version = done.stdout.decode().rpartition("|")
            return body, http_version

        # curl checks each certificate against the CA and the name it asked for.
        self.assertEqual(https("a.test", "--http2"), ("a.test over HTTP/2\n", "2"))
        self.assertEqual(https("b.test", "--http2"), ("b.test over HTTP/2\n", "2"))
        self.assertEqual(https("a.test", "--http1.1"), ("a.test over HTTP/1.1\n", "1.1"))
        done = run_client(
            [
                *("curl", "-sS", "--max-time", str(CLIENT), "-o", "/dev/null"),
                *("-w", "%{http_code} %{redirect_url}", "--resolve", f"a.test:{port}:127.0.0.1"),
                f"http://a.test:{port}/page?x=1",
            ]
        )
        self.assertEqual(done.stdout.decode(), f"301 https://a.test:{port}/page?x=1", done.stderr)
        done = run_client(
            [
                "curl",
                "-sS",
                "-L",
                "--max-time",
                str(CLIENT),
                "--cacert",
                ca_path,
                "--resolve",
                f"b.test:{port}:127.0.0.1",
                f"http://b.test:{port}/",
            ]
        )
        self.assertEqual(done.stdout, b"b.test over HTTP/2\n", done.stderr)
        self.assertStops(running)


HAPROXY = """\
global
    maxconn 50
defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend front
    bind 127.0.0.1:{front}
    default_backend muxtwist
backend muxtwist
    server m1 127.0.0.1:{port} send-proxy-v2
"""


def proxy_v2_header(source: str, source_port: int, destination: str, destination_port: int) -> bytes:
    """A PROXY protocol v2 header for a TCP over IPv4 connection, as load balancers send it."""
    addresses = (
        socket.inet_aton(source) + socket.inet_aton(destination) + struct.pack("!HH", source_port, destination_port)
    )
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


class ProductionTests(ExampleTestCase):
    """examples/production: behind HAProxy with PROXY v2, from a systemd socket, and with --workers 2."""

    RULES = ("--config", "examples/production/rules.py")

    def test_behind_haproxy(self) -> None:
        """Through HAProxy's send-proxy-v2, rules and logs see the client's own address and port."""
        port, front = free_port(), free_port()
        running = self.start([*TWISTD, "--port", f"tcp:{port}:interface=127.0.0.1", *self.RULES])
        running.listening_ports()
        folder = tempfile.mkdtemp(prefix="muxtwist-example-")
        self.addCleanup(shutil.rmtree, folder, True)
        config = os.path.join(folder, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(HAPROXY.format(front=front, port=port))
        haproxy = subprocess.Popen(["haproxy", "-db", "-f", config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.addCleanup(lambda: (haproxy.poll() is None and haproxy.kill(), haproxy.communicate()))
        wait_port(front)

        def through_haproxy(interface: str) -> tuple[str, int]:
            done = run_client(
                [
                    *("curl", "-sS", "--fail", "--max-time", str(CLIENT), "--interface", interface),
                    *("-w", "|%{local_port}", f"http://127.0.0.1:{front}/"),
                ]
            )
            self.assertEqual(done.returncode, 0, done.stderr)
            body, _, local_port = done.stdout.decode().rpartition("|")
            return body, int(local_port)

        body, office_port = through_haproxy("127.0.0.2")
        self.assertTrue(body.startswith("hello, office; process "), body)
        body, world_port = through_haproxy("127.0.0.1")
        self.assertTrue(body.startswith("hello, world; process "), body)
        # The log names curl's own address and port, not HAProxy's connection.
        running.wait_for(
            rf"connection 127\.0\.0\.2:{office_port} -> port {port} ended: handed_off, rule office".encode()
        )
        running.wait_for(rf"connection 127\.0\.0\.1:{world_port} -> port {port} ended: handed_off, rule web".encode())
        self.assertStops(running)

    def test_proxy_v2_header_and_untrusted_peer(self) -> None:
        """A v2 header from a trusted peer routes by its source; from an untrusted peer it is refused."""
        running = self.start(
            [*TWISTD, "--port", "tcp:0:interface=127.0.0.1", *self.RULES], {"TRUSTED_PROXIES": "127.0.0.1/32"}
        )
        (port,) = running.listening_ports()
        request = b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"
        header = proxy_v2_header("127.0.0.2", 40000, "127.0.0.1", port)
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT) as s:
            s.sendall(header + request)
            self.assertIn(b"hello, office; process ", read_all(s))
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT) as s:
            s.sendall(request)
            # A trusted peer must send a header: without one the connection is refused.
            self.assertEqual(read_all(s), b"")
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT, source_address=("127.0.0.3", 0)) as s:
            s.sendall(header + request)
            self.assertEqual(read_all(s), b"")
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT, source_address=("127.0.0.3", 0)) as s:
            s.sendall(b"ECHO untrusted peers sniffed as usual\n")
            s.shutdown(socket.SHUT_WR)
            self.assertEqual(read_all(s), b"ECHO untrusted peers sniffed as usual\n")
        running.wait_for(rb"connection 127\.0\.0\.2:40000 -> port \d+ ended: handed_off, rule office")
        self.assertStops(running)

    def test_systemd_socket_activation(self) -> None:
        """With the service unit's --port, a socket passed as fd 3 with LISTEN_FDS is served, and SIGTERM exits 0."""
        with open(os.path.join(EXAMPLES, "production", "muxtwist.service")) as f:
            (exec_start,) = [line for line in f if line.startswith("ExecStart=")]
        (port_option,) = re.findall(r"--port (systemd:\S+)", exec_start)
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        port = listening.getsockname()[1]
        # What systemd does: the socket as fd 3, LISTEN_PID naming the process that execs twistd.
        wrapper = (
            "import os, sys\n"
            "fd = int(sys.argv[1])\n"
            "os.dup2(fd, 3)\n"
            "os.set_inheritable(3, True)\n"
            "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES='muxtwist')\n"
            "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
        )
        running = Running(
            [sys.executable, "-c", wrapper, str(listening.fileno()), *TWISTD[1:], "--port", port_option, *self.RULES],
            {"TRUSTED_PROXIES": "192.0.2.1/32"},
            pass_fds=(listening.fileno(),),
        )
        self.addCleanup(running.kill)
        listening.close()  # only the server holds it now
        running.wait_for(rb"SniffingFactory starting on " + str(port).encode())
        self.assertTrue(curl(port).startswith("hello, world; process "))
        self.assertEqual(nc(port, b"ECHO from systemd\n"), b"ECHO from systemd\n")
        self.assertStops(running)

    def test_workers(self) -> None:
        """--workers 2: two worker processes answer on the one port; SIGTERM stops both and exits 0."""
        port = free_port()
        running = self.start(
            [*TWISTD, "--port", f"tcp:{port}:interface=127.0.0.1", "--workers", "2", *self.RULES],
            {"TRUSTED_PROXIES": "192.0.2.1/32"},
        )
        running.wait_for(rb"SniffingFactory starting on " + str(port).encode(), count=2)
        pids: set[int] = set()
        deadline = time.monotonic() + STARTUP
        while len(pids) < 2 and time.monotonic() < deadline:
            # Several clients at once, so that both workers are woken.
            socks = [socket.create_connection(("127.0.0.1", port), timeout=CLIENT) for _ in range(8)]
            for s in socks:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            for s in socks:
                with s:
                    found = re.search(rb"process (\d+)", read_all(s))
                    assert found is not None
                    pids.add(int(found.group(1)))
        self.assertEqual(len(pids), 2, pids)
        self.assertNotIn(running.process.pid, pids)
        self.assertStops(running)
        for pid in pids:
            with self.assertRaises(ProcessLookupError):
                os.kill(pid, 0)


def readme_blocks(language: str) -> list[str]:
    """The README's fenced code blocks in ``language``, in order."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


class ReadmeTests(ExampleTestCase):
    """The README's own snippets, as a reader would paste them."""

    def test_embedding_snippet_runs_alone(self) -> None:
        """The embedding snippet, pasted alone into a file, serves HTTP and echo (on a free port here)."""
        (snippet,) = [b for b in readme_blocks("python") if "reactor.run()" in b]
        port = free_port()
        self.assertEqual(snippet.count('"tcp:3000"'), 1)
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        script = os.path.join(folder, "embedded.py")
        with open(script, "w") as f:
            f.write(snippet.replace('"tcp:3000"', f'"tcp:{port}:interface=127.0.0.1"'))
        running = self.start([sys.executable, script])
        wait_port(port)
        self.assertEqual(curl(port), "hello from HTTP\n")
        self.assertEqual(nc(port, b"hello\n"), b"hello\n")
        self.assertStops(running, twistd=False)

    def test_rules_snippet_checks(self) -> None:
        """The README's rules.py passes ``python -m muxtwist check`` as written."""
        (rules,) = [
            b
            for b in readme_blocks("python")
            if b.lstrip().startswith("from") and "rules = [" in b and "reactor" not in b
        ]
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        with open(os.path.join(folder, "rules.py"), "w") as f:
            f.write(rules)
        done = subprocess.run(
            [sys.executable, "-m", "muxtwist", "check", "rules.py", "--port", "3000"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stderr, "")

    def test_named_files_exist(self) -> None:
        """Every docs/ file the README names exists."""
        with open(os.path.join(ROOT, "README.md")) as f:
            text = f.read()
        named = set(re.findall(r"docs/[\w/.-]+\.(?:rst|md)", text))
        self.assertIn("docs/reference/sniffing.rst", named)
        for path in named:
            self.assertTrue(os.path.exists(os.path.join(ROOT, path)), path)


def recipe_setup(name: str) -> list[str]:
    """The ``sh`` code blocks of a how-to's "Before you start" section, as written."""
    with open(os.path.join(ROOT, "docs", "howto", name + ".rst")) as f:
        text = f.read()
    section = text.split("Before you start\n----------------\n", 1)[1].split("\n----", 1)[0]
    blocks = []
    for found in re.finditer(r"\.\. code-block:: sh\n\n((?:   .*\n|\n)+)", section):
        blocks.append(textwrap.dedent(found.group(1)).strip() + "\n")
    return blocks


def installed(pip_line: str) -> list[str]:
    """The distributions a ``pip install`` line names, besides the checkout itself."""
    return [word for word in shlex.split(pip_line)[2:] if word != "." and not word.startswith("-")]


class RecipeSetupTests(ExampleTestCase):
    """Each how-to starts with the exact install and setup lines, and they work as written."""

    def scratch(self) -> str:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        return folder

    def test_grpc_recipe_installs_what_it_uses(self) -> None:
        """The gRPC recipe installs muxtwist, h2 and grpcio: the packages its handler and client import."""
        (install,) = recipe_setup("grpc-and-http")
        self.assertEqual(install, "pip install . h2 grpcio\n")
        modules = {"h2": "h2", "grpcio": "grpc"}
        for distribution in installed(install):
            __import__(modules[distribution])
        with open(os.path.join(EXAMPLES, "grpc_and_http", "greeter_grpc.py")) as f:
            self.assertIn("from h2.connection import H2Connection", f.read())

    def test_tls_recipe_certificates(self) -> None:
        """The TLS recipe's openssl commands make certificates the example serves and curl accepts, per host."""
        install, certificates = recipe_setup("tls-sites")
        self.assertEqual(install, "pip install .\n")
        folder = self.scratch()
        done = subprocess.run(["sh", "-e", "-c", certificates], cwd=folder, capture_output=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(sorted(os.listdir(os.path.join(folder, "certs"))), ["a.test.pem", "b.test.pem"])
        port = free_port()
        running = self.start(
            [*TWISTD, "--port", f"tcp:{port}:interface=127.0.0.1", "--config", "examples/tls_sites/rules.py"],
            {"CERT_DIR": os.path.join(folder, "certs"), "PUBLIC_PORT": str(port)},
        )
        running.listening_ports()
        for host in ("a.test", "b.test"):
            done = run_client(
                [
                    *("curl", "-sS", "--fail", "--max-time", str(CLIENT), "--cacert", os.path.join(folder, "ca.pem")),
                    *("--http2", "--resolve", f"{host}:{port}:127.0.0.1", f"https://{host}:{port}/"),
                ]
            )
            self.assertEqual(done.stdout.decode(), f"{host} over HTTP/2\n", done.stderr)
        self.assertStops(running)

    async def test_port_reuse_recipe_servers(self) -> None:
        """The port-reuse recipe's nginx, redis-server and sshd start as written and serve through the example."""
        install, prepare, start = recipe_setup("port-reuse")
        self.assertIn("apt-get install -y nginx redis-server", install)
        folder = self.scratch()
        ports = {"8080": free_port(), "6379": free_port(), "2222": free_port()}

        def on_free_ports(command: str) -> str:
            for written, port in ports.items():
                command = command.replace(written, str(port))
            return command

        done = subprocess.run(["bash", "-e", "-c", on_free_ports(prepare)], cwd=folder, capture_output=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        for line in start.splitlines():
            # Each in its own process group, as in its own terminal; stopped with its children.
            self.start(["bash", "-c", on_free_ports(line)], cwd=folder)
        for port in ports.values():
            wait_port(port)
        running = self.start(
            [*TWISTD, "--port", "tcp:0:interface=127.0.0.1", "--config", "examples/port_reuse/rules.py"],
            {"NGINX_PORT": str(ports["8080"]), "REDIS_PORT": str(ports["6379"]), "SSHD_PORT": str(ports["2222"])},
        )
        (port,) = running.listening_ports()
        self.assertEqual(curl(port), "hello from nginx")
        done = run_client(["redis-cli", "-p", str(port), "PING"])
        self.assertEqual(done.stdout, b"PONG\n", done.stderr)
        done = run_client(["ssh-keyscan", "-T", str(int(CLIENT)), "-t", "ed25519", "-p", str(port), "127.0.0.1"])
        with open(os.path.join(folder, "ssh_host_ed25519_key.pub")) as f:
            self.assertIn(f.read().split()[1].encode(), done.stdout, done.stderr)
        self.assertStops(running)


GUIDES = ("docs/migration", "docs/howto", "docs/tutorial.rst", "docs/tls.md", "docs/reference/rules-file.rst")


def python_blocks(path: str) -> list[str]:
    """The Python code blocks of an .rst or .md page."""
    with open(path) as f:
        text = f.read()
    if path.endswith(".md"):
        return re.findall(r"```python\n(.*?)```", text, re.S)
    return [
        textwrap.dedent(found.group(1))
        for found in re.finditer(r"\.\. code-block:: python\n(?:   :.*\n)*\n((?:   .*\n|\n)+)", text)
    ]


def guide_pages() -> list[str]:
    pages = []
    for entry in GUIDES:
        path = os.path.join(ROOT, entry)
        if os.path.isdir(path):
            pages += sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith((".rst", ".md")))
        else:
            pages.append(path)
    return pages


class GuideTests(ExampleTestCase):
    """The guides' own examples say what the code does."""

    def test_every_rule_in_the_guides_is_named(self) -> None:
        """Every Rule(...) in the guides' code (and the example files they include) has name=."""
        import ast

        sources = [(page, block) for page in guide_pages() for block in python_blocks(page)]
        for folder, _, files in os.walk(EXAMPLES):
            for name in files:
                if name.endswith(".py") and "test" not in name:
                    with open(os.path.join(folder, name)) as f:
                        sources.append((os.path.join(folder, name), f.read()))
        checked = 0
        for where, source in sources:
            try:
                tree = ast.parse(source)
            except SyntaxError:
                continue  # a fragment with "..." in it
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Rule":
                    checked += 1
                    self.assertIn("name", [k.arg for k in node.keywords], f"{where}: line {node.lineno}")
        self.assertGreater(checked, 30)

    def test_sslh_guide_timeout_with_some_bytes(self) -> None:
        """With the sslh guide's rules, a client that sent 'GE' and then nothing goes to the Any() rule."""
        from muxtwist.interfaces import ConnectionInfo
        from muxtwist.testing import route

        page = os.path.join(ROOT, "docs", "migration", "sslh.rst")
        (rules_py,) = [b for b in python_blocks(page) if "rules = [" in b]
        namespace: dict[str, object] = {}
        exec(compile(rules_py, page, "exec"), namespace)
        result = route(namespace["rules"], b"GE", ConnectionInfo(), final=True)  # type: ignore[arg-type]
        self.assertEqual(result.name, "anyprot")
        with open(page) as f:
            text = " ".join(f.read().split())
        self.assertIn("nothing more goes to the ``Any()`` rule (``anyprot``", text)
