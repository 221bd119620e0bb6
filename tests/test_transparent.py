"""
Transparent proxying on real network namespaces: a client host, muxtwist in
the middle and a backend host, joined by veth pairs, each a namespace these
tests make and remove. A real sshd and a real nginx behind the mux log the
address the connection came from, which must be the client's; ``doctor``
names what the host is missing; a process with neither ``CAP_NET_RAW`` nor
``CAP_NET_ADMIN`` is refused at load with one clear line.

These tests need root (network namespaces, nftables); CI runs as root.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence

from twisted.trial import unittest

from muxtwist.doctor import marking_commands
from muxtwist.transparent import TransparentEndpoint, unavailable_reason
from tests.processes import stop_group
from tests.twistd import ROOT, twistd_command

CLIENT, MUX_FRONT, MUX_BACK, BACKEND = "10.77.1.2", "10.77.1.1", "10.77.2.1", "10.77.2.2"
CLIENT6, MUX_FRONT6, MUX_BACK6, BACKEND6 = "fd77:1::2", "fd77:1::1", "fd77:2::1", "fd77:2::2"
WAIT = 20.0
_counter = itertools.count()


def _why_not() -> str | None:
    if not sys.platform.startswith("linux"):
        return "Linux only"
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nft", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (see .ci/apt-packages.txt)"
    return None


SKIP = _why_not()


def sh(*args: str, check: bool = True, timeout: float = WAIT) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


class Hosts:
    """Three namespaces, client -- mux -- backend, with the addresses above; removed by ``remove()``."""

    def __init__(self) -> None:
        self.prefix = f"mt{os.getpid() % 10000}x{next(_counter)}"
        self.names = {role: f"{self.prefix}{role}" for role in ("c", "m", "b")}
        self.created: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        try:
            self._build()
        except BaseException:
            self.remove()
            raise

    def ns(self, role: str) -> str:
        return self.names[role]

    def _build(self) -> None:
        p = self.prefix
        for name in self.names.values():
            sh("ip", "netns", "add", name)
            self.created.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        c, m, b = self.names["c"], self.names["m"], self.names["b"]
        sh("ip", "link", "add", f"{p}c0", "netns", c, "type", "veth", "peer", "name", f"{p}m0", "netns", m)
        sh("ip", "link", "add", f"{p}m1", "netns", m, "type", "veth", "peer", "name", f"{p}b0", "netns", b)
        for ns, dev, address, address6 in (
            (c, f"{p}c0", CLIENT, CLIENT6),
            (m, f"{p}m0", MUX_FRONT, MUX_FRONT6),
            (m, f"{p}m1", MUX_BACK, MUX_BACK6),
            (b, f"{p}b0", BACKEND, BACKEND6),
        ):
            sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            # nodad: the address is usable at once, not after duplicate address detection.
            sh("ip", "-n", ns, "-6", "addr", "add", f"{address6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", c, "route", "add", "default", "via", MUX_FRONT)
        sh("ip", "-n", b, "route", "add", "default", "via", MUX_BACK)
        sh("ip", "-n", c, "-6", "route", "add", "default", "via", MUX_FRONT6)
        sh("ip", "-n", b, "-6", "route", "add", "default", "via", MUX_BACK6)

    def run(self, role: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.ns(role), *args, check=check)

    def start(self, role: str, args: Sequence[str], log: str, cwd: str | None = None) -> subprocess.Popen[bytes]:
        """A process in ``role``'s namespace, in its own process group, output to ``log``."""
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(role), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=cwd,
            )
        self.processes.append(proc)
        return proc

    def apply(self, commands: Sequence[str]) -> None:
        """Run shell commands (as ``doctor`` prints them) in the mux namespace."""
        for command in commands:
            sh("ip", "netns", "exec", self.ns("m"), "sh", "-c", command)

    def remove(self) -> None:
        for proc in self.processes:
            stop_group(proc)
        for name in self.created:
            sh("ip", "netns", "del", name, check=False)
        self.created = []


def wait_listening(hosts: Hosts, role: str, address: str, port: int, proc: subprocess.Popen[bytes], log: str) -> None:
    """Wait until ``address:port`` accepts connections inside ``role``'s namespace."""
    probe = f"import socket; socket.create_connection(({address!r}, {port}), timeout=0.5).close()"
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log) as f:
                raise AssertionError(f"exited with {proc.returncode}: {f.read()[-2000:]}")
        if hosts.run(role, sys.executable, "-c", probe, check=False).returncode == 0:
            return
        time.sleep(0.1)
    with open(log) as f:
        raise AssertionError(f"nothing listens on {address}:{port} in {role}: {f.read()[-2000:]}")


def start_nginx(hosts: Hosts, role: str, directory: str, address: str, port: int) -> str:
    """A real nginx in ``role``'s namespace that logs each client address; the access log's path."""
    access = os.path.join(directory, f"access-{port}.log")
    conf = os.path.join(directory, f"nginx-{port}.conf")
    with open(conf, "w") as f:
        f.write(
            textwrap.dedent(
                f"""
                pid {directory}/nginx-{port}.pid;
                error_log {directory}/nginx-{port}-error.log;
                worker_processes 1;
                events {{ worker_connections 64; }}
                http {{
                    log_format peer "$remote_addr";
                    access_log {access} peer;
                    client_body_temp_path {directory}/body;
                    proxy_temp_path {directory}/proxy;
                    fastcgi_temp_path {directory}/fastcgi;
                    uwsgi_temp_path {directory}/uwsgi;
                    scgi_temp_path {directory}/scgi;
                    server {{
                        listen {f"[{address}]" if ":" in address else address}:{port};
                        location / {{ return 200 "you are $remote_addr\\n"; }}
                    }}
                }}
                """
            )
        )
    log = os.path.join(directory, f"nginx-{port}.out")
    proc = hosts.start(role, ["nginx", "-c", conf, "-p", directory, "-g", "daemon off;"], log)
    wait_listening(hosts, role, address, port, proc, log)
    return access


def start_sshd(hosts: Hosts, role: str, directory: str, address: str, port: int) -> str:
    """A real sshd in ``role``'s namespace; its log (which names each client address)."""
    key = os.path.join(directory, "host_ed25519")
    if not os.path.exists(key):
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
    os.makedirs("/run/sshd", exist_ok=True)
    conf = os.path.join(directory, f"sshd-{port}.conf")
    with open(conf, "w") as f:
        f.write(
            f"HostKey {key}\nListenAddress {address}:{port}\nPidFile none\nLogLevel VERBOSE\n"
            "UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        )
    log = os.path.join(directory, f"sshd-{port}.log")
    proc = hosts.start(role, ["/usr/sbin/sshd", "-D", "-e", "-f", conf], log)
    wait_listening(hosts, role, address, port, proc, log)
    return log


def write_rules(directory: str, rules: str) -> str:
    path = os.path.join(directory, "rules.py")
    with open(path, "w") as f:
        f.write(textwrap.dedent(rules))
    return path


def start_mux(
    hosts: Hosts,
    directory: str,
    rules: str,
    env: dict[str, str] | None = None,
    port: int = 443,
    listeners: Sequence[str] = (),
    prefix: Sequence[str] = (),
) -> tuple[subprocess.Popen[bytes], str]:
    """
    twistd muxtwist in the mux namespace on ``listeners`` (default
    ``tcp:port``), run through ``prefix`` (``setpriv ... --``, say), once
    MUX_FRONT:port answers.
    """
    log = os.path.join(directory, "muxtwist.log")
    variables = [f"{k}={v}" for k, v in {"PYTHONPATH": ROOT, **(env or {})}.items()]
    ports = [a for listener in listeners or [f"tcp:{port}"] for a in ("--port", listener)]
    args = [*prefix, "env", *variables, *twistd_command(*ports, "--config", rules)]
    proc = hosts.start("m", args, log, cwd=directory)
    wait_listening(hosts, "m", MUX_FRONT, port, proc, log)
    return proc, log


def read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def until(condition: object, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class TransparentTestCase(unittest.SynchronousTestCase):
    skip = SKIP

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="muxtwist-transparent-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.hosts = Hosts()
        self.addCleanup(self.hosts.remove)

    def http_rules(self) -> str:
        """A rules file relaying HTTP to nginx on the backend host from the client's own address."""
        return write_rules(
            self.directory,
            f"""
            from muxtwist import Rule
            from muxtwist.actions import Proxy
            from muxtwist.matchers import HTTP1
            rules = [Rule(HTTP1(), Proxy("tcp:host={BACKEND}:port=8080", transparent=True))]
            """,
        )

    def doctor(self, rules: str) -> subprocess.CompletedProcess[str]:
        return self.hosts.run(
            "m", "env", f"PYTHONPATH={ROOT}", sys.executable, "-m", "muxtwist", "doctor", rules, check=False
        )

    def set_up_with_doctor(self, rules: str) -> None:
        """Run doctor, apply the commands it prints, and run it again: now it must pass."""
        first = self.doctor(rules)
        self.first_doctor = first.stdout
        self.assertEqual(first.returncode, 1, first.stdout + first.stderr)
        commands = [
            line.strip() for line in first.stdout.split("to fix, run as root:", 1)[1].splitlines() if line.strip()
        ]
        self.hosts.apply(commands)
        second = self.doctor(rules)
        self.assertEqual(second.returncode, 0, second.stdout + second.stderr)
        self.assertIn("everything transparent proxying needs is in place", second.stdout)


class SeparateHostTests(TransparentTestCase):
    """Backends on another host, whose default route is the mux."""

    def test_sshd_and_nginx_log_the_client_address(self) -> None:
        """
        examples/transparent, set up with the commands doctor prints: ssh-keyscan
        and curl reach a real sshd and nginx that see the client's own address.
        """
        ssh_log = start_sshd(self.hosts, "b", self.directory, BACKEND, 22)
        access = start_nginx(self.hosts, "b", self.directory, BACKEND, 8080)
        rules = os.path.join(ROOT, "examples", "transparent", "rules.py")
        self.env = {"SSH_BACKEND": f"tcp:host={BACKEND}:port=22", "HTTP_BACKEND": f"tcp:host={BACKEND}:port=8080"}
        self.set_up_with_doctor(rules)
        mux, mux_log = start_mux(self.hosts, self.directory, rules, self.env)

        page = self.hosts.run("c", "curl", "-sS", "--max-time", "5", f"http://{MUX_FRONT}:443/")
        self.assertEqual(page.stdout, f"you are {CLIENT}\n")
        until(lambda: CLIENT in read(access), "nginx's access log")
        self.assertNotIn(MUX_BACK, read(access))

        keys = self.hosts.run("c", "ssh-keyscan", "-T", "5", "-p", "443", MUX_FRONT)
        self.assertIn("ssh-ed25519", keys.stdout)
        until(lambda: f"Connection from {CLIENT} port" in read(ssh_log), "sshd's log line")
        self.assertNotIn(f"Connection from {MUX_BACK}", read(ssh_log))

        until(lambda: "relayed from the client's address" in read(mux_log), "a connection_end line saying so")


def connect_timeouts(log: str) -> int:
    """
    The connect timeouts the proxy's log counts: its failure lines are one a
    second per backend, each counting those left out since the last, and the
    last count comes in a line of its own.
    """
    count = 0
    for line in log.splitlines():
        if "no connection within 1" not in line:
            continue
        alone = re.search(r"failed for (\d+) more clients", line)
        if alone is not None:
            count += int(alone.group(1))
            continue
        more = re.search(r"\((\d+) more failures since the last line\)", line)
        count += 1 + (int(more.group(1)) if more is not None else 0)
    return count


class FailingBackendTests(TransparentTestCase):
    """Backends that refuse or never answer."""

    def test_a_failed_backend_is_not_logged_as_relayed_from_the_client(self) -> None:
        """A refused client's connection_end says backend_failed, not 'relayed from the client's address'."""
        rules = write_rules(
            self.directory,
            f"""
            from muxtwist import Rule
            from muxtwist.actions import Proxy
            from muxtwist.matchers import HTTP1
            rules = [Rule(HTTP1(), Proxy("tcp:host={BACKEND}:port=9", transparent=True), name="refused")]
            """,
        )
        self.set_up_with_doctor(rules)
        _, log = start_mux(self.hosts, self.directory, rules)
        self.assertEqual(curl(self.hosts, f"http://{MUX_FRONT}:443/"), "")
        until(lambda: "ended: backend_failed" in read(log), "the connection_end line")
        (line,) = [line for line in read(log).splitlines() if "ended: backend_failed" in line]
        self.assertNotIn("relayed from the client's address", line)

    def test_black_holed_backend_times_out_and_leaves_no_descriptor(self) -> None:
        """Twenty clients of a backend that drops every SYN are closed after connect_timeout, every socket with them."""
        self.hosts.run("b", "nft", "add table inet hole")
        self.hosts.run("b", "nft", "add chain inet hole input { type filter hook input priority 0; }")
        self.hosts.run("b", "nft", "add rule inet hole input tcp dport 9999 drop")
        rules = write_rules(
            self.directory,
            f"""
            from muxtwist import Rule
            from muxtwist.actions import Proxy
            from muxtwist.matchers import HTTP1
            rules = [Rule(HTTP1(), Proxy("tcp:host={BACKEND}:port=9999", transparent=True, connect_timeout=1))]
            """,
        )
        self.set_up_with_doctor(rules)
        mux, log = start_mux(self.hosts, self.directory, rules)
        before = len(os.listdir(f"/proc/{mux.pid}/fd"))
        clients = [
            self.hosts.start("c", ["curl", "-sS", "--max-time", "5", f"http://{MUX_FRONT}:443/"], os.devnull)
            for _ in range(20)
        ]
        for client in clients:
            client.wait(timeout=WAIT)
        until(lambda: connect_timeouts(read(log)) == 20, "20 connect timeouts")
        until(lambda: len(os.listdir(f"/proc/{mux.pid}/fd")) == before, f"{before} descriptors again")


class ProxyProtocolTests(TransparentTestCase):
    """A HAProxy in front that sends the PROXY protocol (v2) to muxtwist."""

    def test_backend_sees_the_address_the_proxy_header_carried(self) -> None:
        """Behind HAProxy (send-proxy-v2 to 127.0.0.1), nginx sees the client HAProxy saw, not HAProxy or the mux."""
        access = start_nginx(self.hosts, "b", self.directory, BACKEND, 8080)
        config = os.path.join(self.directory, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(
                "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 10s\n  timeout server 10s\n"
                f"frontend front\n  bind {MUX_FRONT}:80\n  default_backend mux\n"
                "backend mux\n  server mux 127.0.0.1:443 send-proxy-v2\n"
            )
        log = os.path.join(self.directory, "haproxy.log")
        haproxy = self.hosts.start("m", ["haproxy", "-db", "-f", config], log)
        wait_listening(self.hosts, "m", MUX_FRONT, 80, haproxy, log)
        rules = write_rules(
            self.directory,
            f"""
            from muxtwist import Rule
            from muxtwist.actions import Proxy
            from muxtwist.matchers import HTTP1
            accept_proxy_protocol = ["127.0.0.1/32"]
            rules = [Rule(HTTP1(), Proxy("tcp:host={BACKEND}:port=8080", transparent=True))]
            """,
        )
        self.set_up_with_doctor(rules)
        start_mux(self.hosts, self.directory, rules)
        self.assertEqual(curl(self.hosts, f"http://{MUX_FRONT}:80/"), f"you are {CLIENT}\n")
        self.assertEqual(read(access).split(), [CLIENT])


class SameHostTests(TransparentTestCase):
    """Backends on the mux's own host: on one of its addresses, and on 127.0.0.1."""

    def test_local_address_and_loopback_backends(self) -> None:
        """A backend on a local address and one on 127.0.0.1 both see the client's address."""
        access_local = start_nginx(self.hosts, "m", self.directory, MUX_BACK, 8081)
        access_loop = start_nginx(self.hosts, "m", self.directory, "127.0.0.1", 8082)
        rules = write_rules(
            self.directory,
            f"""
            from muxtwist import Rule
            from muxtwist.actions import Proxy
            from muxtwist.matchers import HTTP1
            rules = [
                Rule(HTTP1(path="/local*"), Proxy("tcp:host={MUX_BACK}:port=8081", transparent=True), name="local"),
                Rule(HTTP1(), Proxy("tcp:host=127.0.0.1:port=8082", transparent=True), name="loopback"),
            ]
            """,
        )
        self.set_up_with_doctor(rules)
        start_mux(self.hosts, self.directory, rules)
        local = self.hosts.run("c", "curl", "-sS", "--max-time", "5", f"http://{MUX_FRONT}:443/local")
        self.assertEqual(local.stdout, f"you are {CLIENT}\n")
        loop = self.hosts.run("c", "curl", "-sS", "--max-time", "5", f"http://{MUX_FRONT}:443/")
        self.assertEqual(loop.stdout, f"you are {CLIENT}\n")
        until(lambda: CLIENT in read(access_local) and CLIENT in read(access_loop), "both access logs")


def tcp(host: str, port: int) -> str:
    """The ``tcp:`` client description of ``host:port``, an IPv6 address's colons escaped."""
    return "tcp:host=" + host.replace(":", "\\:") + f":port={port}"


def curl(hosts: Hosts, url: str) -> str:
    """The body curl gets for ``url`` from the client namespace ("" when the connection is closed on it)."""
    return hosts.run("c", "curl", "-sS", "--max-time", "5", url, check=False).stdout


class IPVersionTests(TransparentTestCase):
    """IPv6 end to end, IPv4 clients of a dual-stack listener, and clients of the other IP version."""

    def test_ipv6_backend_sees_the_client_ipv6_address(self) -> None:
        """With the ip -6 lines doctor prints applied, an IPv6 backend sees the client's IPv6 address."""
        access = start_nginx(self.hosts, "b", self.directory, BACKEND6, 8080)
        rules = write_rules(
            self.directory,
            f"""
            from muxtwist import Rule
            from muxtwist.actions import Proxy
            from muxtwist.matchers import HTTP1
            rules = [Rule(HTTP1(), Proxy({tcp(BACKEND6, 8080)!r}, transparent=True))]
            """,
        )
        self.set_up_with_doctor(rules)
        self.assertIn("ip -6 rule add fwmark 0x1 lookup 100", self.first_doctor)
        start_mux(self.hosts, self.directory, rules, listeners=["tcp:443", r"tcp6:443:interface=fd77\:1\:\:1"])
        self.assertEqual(curl(self.hosts, f"http://[{MUX_FRONT6}]:443/"), f"you are {CLIENT6}\n")
        until(lambda: CLIENT6 in read(access), "nginx's access log")

    def test_ipv4_client_of_a_dual_stack_listener_keeps_its_address(self) -> None:
        """An IPv4 client that reached a '::' listener (an IPv4-mapped address) is relayed from its IPv4 address."""
        access = start_nginx(self.hosts, "b", self.directory, BACKEND, 8080)
        rules = self.http_rules()
        self.set_up_with_doctor(rules)
        start_mux(self.hosts, self.directory, rules, listeners=[r"tcp6:443:interface=\:\:"])
        self.assertEqual(curl(self.hosts, f"http://{MUX_FRONT}:443/"), f"you are {CLIENT}\n")
        self.assertIn(CLIENT, read(access))

    def test_clients_of_the_other_ip_version_do_not_take_backends_down(self) -> None:
        """
        With an IPv4 and an IPv6 backend, each client goes to the one of its
        own IP version (max_fails=1 would mark the other down after one miss);
        a client with no backend of its version is relayed from the host's address.
        """
        start_nginx(self.hosts, "b", self.directory, BACKEND, 8080)
        start_nginx(self.hosts, "b", self.directory, BACKEND6, 8086)
        v4, v6 = tcp(BACKEND, 8080), tcp(BACKEND6, 8086)
        rules = write_rules(
            self.directory,
            f"""
            from muxtwist import Rule
            from muxtwist.actions import Proxy
            from muxtwist.matchers import HTTP1
            rules = [
                Rule(HTTP1(path="/only4"), Proxy({v4!r}, transparent=True), name="only4"),
                Rule(HTTP1(), Proxy([{v4!r}, {v6!r}], transparent=True, max_fails=1, fail_timeout=60)),
            ]
            """,
        )
        self.set_up_with_doctor(rules)
        start_mux(self.hosts, self.directory, rules, listeners=["tcp:443", r"tcp6:443:interface=fd77\:1\:\:1"])
        for _ in range(3):
            self.assertEqual(curl(self.hosts, f"http://[{MUX_FRONT6}]:443/"), f"you are {CLIENT6}\n")
            self.assertEqual(curl(self.hosts, f"http://{MUX_FRONT}:443/"), f"you are {CLIENT}\n")
        self.assertEqual(curl(self.hosts, f"http://[{MUX_FRONT6}]:443/only4"), f"you are {MUX_BACK}\n")


class DoctorTests(TransparentTestCase):
    """``python -m muxtwist doctor`` on a host that lacks some of the setup."""

    def rules(self) -> str:
        return write_rules(
            self.directory,
            f"""
            from muxtwist import Rule
            from muxtwist.actions import Proxy
            from muxtwist.matchers import SSH
            rules = [Rule(SSH(), Proxy("tcp:host={BACKEND}:port=22", transparent=True), name="ssh")]
            """,
        )

    def test_names_exactly_what_is_missing(self) -> None:
        """With the policy route in place but no marking, doctor reports only the marking and prints its commands."""
        self.hosts.apply(["ip -4 rule add fwmark 0x1 lookup 100", "ip -4 route add local 0.0.0.0/0 dev lo table 100"])
        done = self.doctor(self.rules())
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        self.assertIn("[ok] capability CAP_NET_RAW or CAP_NET_ADMIN", done.stdout)
        self.assertIn("[ok] IPv4 rule", done.stdout)
        self.assertIn("[ok] IPv4 table 100", done.stdout)
        self.assertIn("[MISSING] packet marking", done.stdout)
        for command in marking_commands():
            self.assertIn(command, done.stdout)
        self.assertNotIn("ip -4 rule add", done.stdout)

    def test_a_half_made_marking_table_is_reported(self) -> None:
        """A marking table missing one rule is reported with the rule it lacks."""
        self.hosts.apply(marking_commands()[:4])
        done = self.doctor(self.rules())
        self.assertEqual(done.returncode, 1)
        (line,) = [line for line in done.stdout.splitlines() if "packet marking" in line]
        self.assertIn("[MISSING]", line)
        self.assertIn("chain output: ct mark 0x1 meta mark != 0x2 meta mark set 0x1", line)
        self.assertIn("chain prerouting: ct mark 0x1 meta mark set 0x1", line)
        self.assertNotIn("chain output: meta mark 0x2 ct mark set 0x1", line)

    def test_a_negated_ip_rule_is_not_the_policy_route(self) -> None:
        """An 'ip rule add not fwmark 0x1 lookup 100' (every packet but the replies) is reported missing."""
        self.hosts.apply(["ip -4 rule add not fwmark 0x1 lookup 100"])
        done = self.doctor(self.rules())
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        self.assertIn("[MISSING] IPv4 rule", done.stdout)
        self.assertIn("ip -4 rule add fwmark 0x1 lookup 100", done.stdout)

    def test_table_100_holding_another_default_route_gets_commands_that_work(self) -> None:
        """A table 100 with a default route of its own is named, and the printed commands, run, fix it."""
        self.hosts.apply([f"ip -4 route add default via {BACKEND} table 100"])
        rules = self.rules()
        done = self.doctor(rules)
        self.assertIn(f"(it has: default via {BACKEND}", done.stdout)
        commands = [line.strip() for line in done.stdout.split("to fix, run as root:", 1)[1].splitlines()]
        self.hosts.apply([c for c in commands if c])
        again = self.doctor(rules)
        self.assertEqual(again.returncode, 0, again.stdout + again.stderr)

    def test_the_docs_iptables_marking_counts(self) -> None:
        """
        With the docs' iptables lines instead of the nft ones, doctor reports
        the marking in place and exits 0, and nginx sees the client's address.
        """
        with open(os.path.join(ROOT, "docs", "howto", "transparent.rst")) as f:
            iptables = [line.strip() for line in f if line.strip().startswith("iptables -t mangle")]
        self.assertEqual(len(iptables), 3)
        self.hosts.apply(
            [*iptables, "ip -4 rule add fwmark 0x1 lookup 100", "ip -4 route add local 0.0.0.0/0 dev lo table 100"]
        )
        access = start_nginx(self.hosts, "b", self.directory, BACKEND, 8080)
        rules = self.http_rules()
        done = self.doctor(rules)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("[ok] packet marking (iptables", done.stdout)
        start_mux(self.hosts, self.directory, rules)
        self.assertEqual(curl(self.hosts, f"http://{MUX_FRONT}:443/"), f"you are {CLIENT}\n")
        self.assertIn(CLIENT, read(access))

    def test_without_the_capability_every_finding_is_reported(self) -> None:
        """Run without CAP_NET_RAW and CAP_NET_ADMIN, doctor still checks the host and lists the capability missing."""
        drop = ["setpriv", "--inh-caps=-net_admin,-net_raw", "--bounding-set=-net_admin,-net_raw", "--"]
        done = self.hosts.run(
            "m",
            "env",
            f"PYTHONPATH={ROOT}",
            *drop,
            sys.executable,
            "-m",
            "muxtwist",
            "doctor",
            self.rules(),
            check=False,
        )
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        self.assertIn("[MISSING] capability CAP_NET_RAW or CAP_NET_ADMIN", done.stdout)
        self.assertIn("AmbientCapabilities=CAP_NET_RAW", done.stdout)
        self.assertIn("[MISSING] IPv4 rule", done.stdout)

    def test_a_marking_table_nft_cannot_read_is_not_called_absent(self) -> None:
        """Without CAP_NET_ADMIN nft cannot list the complete marking table: doctor says so, not 'does not exist'."""
        self.hosts.apply(marking_commands())
        drop = ["setpriv", "--inh-caps=-net_admin,-net_raw", "--bounding-set=-net_admin,-net_raw", "--"]
        done = self.hosts.run(
            "m",
            "env",
            f"PYTHONPATH={ROOT}",
            *drop,
            sys.executable,
            "-m",
            "muxtwist",
            "doctor",
            self.rules(),
            check=False,
        )
        (line,) = [line for line in done.stdout.splitlines() if "packet marking" in line]
        self.assertIn("nft could not list it", line)
        self.assertNotIn("nft add rule", done.stdout)

    def test_a_file_without_transparent_rules_passes(self) -> None:
        """A rules file with no transparent rule has nothing to check and exits 0."""
        rules = write_rules(
            self.directory,
            "from muxtwist import Rule\nfrom muxtwist.actions import Proxy\nfrom muxtwist.matchers import SSH\n"
            "rules = [Rule(SSH(), Proxy('tcp:host=127.0.0.1:port=22'), name='ssh')]\n",
        )
        done = self.doctor(rules)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("nothing to check", done.stdout)

    def test_a_table_set_up_by_its_declared_name_is_in_place(self) -> None:
        """
        With '100 muxtwist' declared in rt_tables.d and the rule and route
        made by that name (which ip rule then prints), doctor exits 0.
        """
        iproute2 = os.path.join(self.directory, "iproute2")
        os.makedirs(os.path.join(iproute2, "rt_tables.d"))
        with open(os.path.join(iproute2, "rt_tables.d", "muxtwist.conf"), "w") as f:
            f.write("100 muxtwist\n")
        # ip and doctor read /etc/iproute2: the scratch directory is mounted
        # there for each command alone, in a mount namespace of its own.
        mount = f'mount --bind {shlex.quote(iproute2)} /etc/iproute2 && exec "$@"'
        named = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh"]
        self.hosts.apply(marking_commands())
        for command in ("rule add fwmark 0x1 lookup muxtwist", "route replace local 0.0.0.0/0 dev lo table muxtwist"):
            self.hosts.run("m", *named, "ip", "-4", *command.split())
        self.assertIn("fwmark 0x1 lookup muxtwist", self.hosts.run("m", *named, "ip", "rule", "show").stdout)
        doctor = ["env", f"PYTHONPATH={ROOT}", sys.executable, "-m", "muxtwist", "doctor", self.rules()]
        done = self.hosts.run("m", *named, *doctor, check=False)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("[ok] IPv4 rule: packets marked 0x1 use table muxtwist (100)", done.stdout)
        self.assertIn("[ok] IPv4 table muxtwist (100): deliver everything locally", done.stdout)

    def test_another_table_number_passes_and_relays_from_the_client(self) -> None:
        """A policy route through table 200 instead of 100 passes doctor, and nginx sees the client's address."""
        access = start_nginx(self.hosts, "b", self.directory, BACKEND, 8080)
        self.hosts.apply(
            [
                *marking_commands(),
                "ip -4 rule add fwmark 0x1 lookup 200",
                "ip -4 route add local 0.0.0.0/0 dev lo table 200",
            ]
        )
        rules = self.http_rules()
        done = self.doctor(rules)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("[ok] IPv4 table 200: deliver everything locally", done.stdout)
        start_mux(self.hosts, self.directory, rules)
        self.assertEqual(curl(self.hosts, f"http://{MUX_FRONT}:443/"), f"you are {CLIENT}\n")
        self.assertIn(CLIENT, read(access))


class CapabilityTests(TransparentTestCase):
    """A process with neither CAP_NET_RAW nor CAP_NET_ADMIN."""

    def test_load_fails_with_one_clear_line(self) -> None:
        """twistd muxtwist with a transparent rule and neither capability exits non-zero, saying how to fix it."""
        rules = write_rules(
            self.directory,
            f"""
            from muxtwist import Rule
            from muxtwist.actions import Proxy
            from muxtwist.matchers import SSH
            rules = [Rule(SSH(), Proxy("tcp:host={BACKEND}:port=22", transparent=True), name="ssh")]
            """,
        )
        drop = ["setpriv", "--inh-caps=-net_admin,-net_raw", "--bounding-set=-net_admin,-net_raw", "--"]
        done = self.hosts.run(
            "m",
            "env",
            f"PYTHONPATH={ROOT}",
            *drop,
            *twistd_command("--port", "tcp:443", "--config", rules),
            check=False,
        )
        self.assertNotEqual(done.returncode, 0)
        output = done.stdout + done.stderr
        self.assertIn("needs CAP_NET_RAW or CAP_NET_ADMIN", output)
        self.assertIn("AmbientCapabilities=CAP_NET_RAW", output)
        self.assertNotIn("Traceback", output)
        check = self.hosts.run(
            "m", "env", f"PYTHONPATH={ROOT}", *drop, sys.executable, "-m", "muxtwist", "check", rules, check=False
        )
        self.assertEqual(check.returncode, 1)
        self.assertEqual(len(check.stderr.strip().splitlines()), 1, check.stderr)
        self.assertRegex(check.stderr, rf"{re.escape(rules)}:\d+: .*CAP_NET_RAW or CAP_NET_ADMIN")


class LoadErrorTests(unittest.SynchronousTestCase):
    """Backends transparent=True cannot connect to are refused when the rules load."""

    skip = SKIP

    def test_description_options_it_would_ignore_are_refused(self) -> None:
        """A backend description with bindAddress= or timeout= is refused with a line naming the option."""
        from muxtwist.actions import Proxy

        for option in ("bindAddress=10.0.0.1", "timeout=3"):
            with self.assertRaises(ValueError) as raised:
                Proxy(f"tcp:host=127.0.0.1:port=22:{option}", transparent=True)
            self.assertIn(option.split("=")[0] + "=", str(raised.exception))


class SystemdLinesTests(TransparentTestCase):
    """The systemd capability lines of the recipe, for a service that runs as a user of its own."""

    def test_the_documented_capabilities_let_a_user_service_listen_on_443_transparently(self) -> None:
        """As 'nobody' with only the recipe's ambient capabilities, a socket gets both options and binds port 443."""
        python = "/usr/bin/python3"  # not a checkout-local interpreter 'nobody' may not read
        if not os.access(python, os.X_OK):
            raise unittest.SkipTest(f"{python} is not installed")
        with open(os.path.join(ROOT, "docs", "howto", "transparent.rst")) as f:
            (line,) = [line.strip() for line in f if line.strip().startswith("AmbientCapabilities=")]
        caps = ",".join("+" + c.removeprefix("CAP_").lower() for c in line.split("=", 1)[1].split())
        probe = (
            "import socket\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_IP, 19, 1); s.setsockopt(socket.SOL_SOCKET, 36, 2)\n"
            "s.bind(('0.0.0.0', 443)); print('ok')\n"
        )
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", f"--inh-caps={caps}"]
        done = self.hosts.run("m", *as_user, f"--ambient-caps={caps}", "--", python, "-c", probe, check=False)
        self.assertEqual(done.stdout.strip(), "ok", done.stderr)

    def test_a_mux_with_only_the_documented_capabilities_relays_from_the_client(self) -> None:
        """twistd muxtwist holding only the recipe's capabilities (bounding set too) relays from the client address."""
        with open(os.path.join(ROOT, "docs", "howto", "transparent.rst")) as f:
            (line,) = [line.strip() for line in f if line.strip().startswith("AmbientCapabilities=")]
        caps = ",".join(["-all", *("+" + c.removeprefix("CAP_").lower() for c in line.split("=", 1)[1].split())])
        access = start_nginx(self.hosts, "b", self.directory, BACKEND, 8080)
        rules = self.http_rules()
        self.set_up_with_doctor(rules)
        limited = ["setpriv", f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set={caps}", "--"]
        mux, _ = start_mux(self.hosts, self.directory, rules, prefix=limited)
        with open(f"/proc/{mux.pid}/status") as f:
            bounding = int(next(line for line in f if line.startswith("CapBnd:")).split()[1], 16)
        self.assertEqual(bounding & (1 << 12), 0, "CAP_NET_ADMIN is in the bounding set")  # CAP_NET_ADMIN is 12
        self.assertEqual(curl(self.hosts, f"http://{MUX_FRONT}:443/"), f"you are {CLIENT}\n")
        self.assertIn(CLIENT, read(access))


class EndpointTests(unittest.TestCase):
    """``TransparentEndpoint`` on this host's loopback, where every 127/8 address is local."""

    skip = SKIP or (None if unavailable_reason() is None else unavailable_reason())

    def backend(self) -> socket.socket:
        """A listening socket on 127.0.0.1, closed at cleanup."""
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(5)
        self.addCleanup(server.close)
        return server

    async def peer_seen(self, endpoint: TransparentEndpoint, server: socket.socket) -> tuple[str, int]:
        """Connect through ``endpoint``; the address ``server`` sees the connection come from."""
        from twisted.internet import protocol

        client = await endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
        self.addCleanup(client.transport.loseConnection)  # type: ignore[attr-defined]
        accepted, peer = server.accept()
        self.addCleanup(accepted.close)
        return (peer[0], peer[1])

    async def test_connects_from_the_given_address_and_port(self) -> None:
        """The backend sees the source address and port it was given."""
        from twisted.internet import reactor

        server = self.backend()
        source_port = _free_port("127.0.0.3")
        endpoint = TransparentEndpoint(reactor, "127.0.0.1", server.getsockname()[1], ("127.0.0.3", source_port))
        peer = await self.peer_seen(endpoint, server)
        self.assertEqual(peer, ("127.0.0.3", source_port))

    async def test_ipv4_mapped_source_connects_from_the_ipv4_address(self) -> None:
        """An IPv4-mapped source (a dual-stack listener's client) connects to an IPv4 backend from its IPv4 address."""
        from twisted.internet import reactor

        server = self.backend()
        source_port = _free_port("127.0.0.3")
        endpoint = TransparentEndpoint(reactor, "127.0.0.1", server.getsockname()[1], ("::ffff:127.0.0.3", source_port))
        peer = await self.peer_seen(endpoint, server)
        self.assertEqual(peer, ("127.0.0.3", source_port))

    async def test_busy_connection_from_the_client_port_falls_back_to_another_port(self) -> None:
        """
        When a connection from the client's address and port to the backend
        exists already (the same client through two listeners), the next one
        comes from the client's address and another port instead of failing.
        """
        from twisted.internet import reactor

        server = self.backend()
        source = ("127.0.0.3", _free_port("127.0.0.3"))
        endpoint = TransparentEndpoint(reactor, "127.0.0.1", server.getsockname()[1], source)
        peers = []
        for _ in range(2):
            peers.append(await self.peer_seen(endpoint, server))
        self.assertEqual(peers[0], source)
        self.assertEqual(peers[1][0], source[0])
        self.assertNotEqual(peers[1][1], source[1])

    async def test_refused_connect_fails_the_deferred(self) -> None:
        """A connect to a closed port fails with ConnectionRefusedError and closes its socket."""
        from twisted.internet import error, protocol, reactor

        writers = set(reactor.getWriters())
        endpoint = TransparentEndpoint(reactor, "127.0.0.1", _free_port("127.0.0.1"), ("127.0.0.3", 0))
        d = endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
        (pending,) = set(reactor.getWriters()) - writers
        with self.assertRaises(error.ConnectionRefusedError):
            await d
        self.assertEqual(set(reactor.getWriters()), writers)
        self.assertEqual(pending.fileno(), -1)

    def test_cancel_closes_the_socket(self) -> None:
        """Cancelling a pending connect removes it from the reactor and closes its socket."""
        from twisted.internet import defer, protocol, reactor

        server = self.backend()
        writers = set(reactor.getWriters())
        endpoint = TransparentEndpoint(reactor, "127.0.0.1", server.getsockname()[1], ("127.0.0.3", 0))
        d = endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
        (pending,) = set(reactor.getWriters()) - writers
        fd = pending.fileno()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertNotIn(pending, reactor.getWriters())
        self.assertEqual(pending.fileno(), -1)
        self.assertFalse(os.path.exists(f"/proc/self/fd/{fd}") and _is_socket_to(fd, server.getsockname()))


def _is_socket_to(fd: int, address: tuple[str, int]) -> bool:
    """Whether descriptor ``fd`` is (still) a socket connected or connecting to ``address``."""
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            return bool(s.getpeername() == address)
    except OSError:
        return False


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
