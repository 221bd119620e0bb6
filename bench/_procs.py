"""
Processes and the machine: installing the tools, free ports, starting and
stopping servers, CPU pinning, and CPU seconds read from ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The Debian packages behind each command the benchmarks run.
TOOLS = {
    "wrk": "wrk",
    "nginx": "nginx",
    "haproxy": "haproxy",
    "sslh": "sslh",
    "sslh-select": "sslh",
    "iperf3": "iperf3",
    "h2load": "nghttp2-client",
    "openssl": "openssl",
    "taskset": "util-linux",
    "valgrind": "valgrind",
}

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def ensure_tools(log: Any) -> dict[str, str | None]:
    """Install what is missing (apt-get, pip) and return where each tool is."""
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if missing and shutil.which("apt-get") is not None:
        log(f"installing {' '.join(missing)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=False, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=False, env=env, stdout=subprocess.DEVNULL)
    for module, package in (("matplotlib", "matplotlib"),):
        try:
            __import__(module)
        except ImportError:
            log(f"installing {package} with pip")
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", package], check=False)
    return {tool: shutil.which(tool) for tool in TOOLS}


def ensure_py_spy(log: Any) -> str | None:
    """py-spy, installed with pip if missing (only the profiling step needs it)."""
    found = shutil.which("py-spy")
    if found is None:
        log("installing py-spy with pip")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=False)
        found = shutil.which("py-spy")
    return found


def raise_nofile(want: int = 65536) -> int:
    """Raise this process's open-file limit as far as allowed (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (want, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
            return limit
        except (ValueError, OSError):
            continue
    return soft


def free_port() -> int:
    """An ephemeral port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _version(argv: Sequence[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "missing"
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def machine(reactor: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    import twisted

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "twisted": twisted.__version__,
        "reactor": reactor,
        "load_average_at_start": os.getloadavg(),
        "tools": {
            "wrk": _version(["wrk", "--version"]),
            "haproxy": _version(["haproxy", "-v"]),
            "sslh": _version(["sslh", "-V"]),
            "nginx": _version(["nginx", "-v"]),
            "iperf3": _version(["iperf3", "--version"]),
            "openssl": _version(["openssl", "version"]),
        },
    }


def pinning() -> tuple[list[str], list[str]]:
    """
    The command prefixes that put servers on CPU 0 and load generators on
    CPU 1, or nothing when the machine has one core or no ``taskset``.
    """
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", "0"], ["taskset", "-c", "1"]
    return [], []


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; fields start after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    children = _children_map()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """
    User plus system CPU seconds of these processes and all their
    descendants, including descendants that have exited and been reaped
    (``cutime``/``cstime``), as in sslh-fork's per-connection children.
    """
    total = 0
    seen: set[int] = set()
    for root in pids:
        for p in process_tree(root):
            if p in seen:
                continue
            seen.add(p)
            fields = _stat_fields(p)
            if fields is not None:
                # utime, stime, cutime, cstime: fields 14-17 of stat, 12-15 here.
                total += sum(int(x) for x in fields[11:15])
    return total / CLOCK_TICKS


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores, every process), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of one process."""
    fields = Path(f"/proc/{pid}/statm").read_text().split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    """The environment of started processes: the repository importable from their temp directory."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


class ServerFailed(RuntimeError):
    """A server did not come up."""


class Server:
    """One started process, its log file, and a clean stop."""

    def __init__(self, name: str, argv: Sequence[str], workdir: Path, *, prefix: Sequence[str] = ()) -> None:
        self.name = name
        self.argv = [*prefix, *argv]
        self.log_path = workdir / f"{name.replace(' ', '_').replace('/', '_')}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            env=_env(),
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_port(self, port: int, timeout: float = 15.0) -> None:
        """Wait until ``port`` accepts connections, or fail with the log's tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerFailed(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            with socket.socket() as s:
                s.settimeout(0.5)
                try:
                    s.connect(("127.0.0.1", port))
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        raise ServerFailed(f"{self.name} did not listen on {port} within {timeout}s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM the process group this server leads, then SIGKILL what is left."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        # Children of forking servers (sslh-fork) may outlive their parent.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()


class Servers:
    """Every server a scenario started; all stopped at the end, whatever happens."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Server] = []

    def start(self, name: str, argv: Sequence[str], *, port: int | None = None, prefix: Sequence[str] = ()) -> Server:
        server = Server(name, argv, self.workdir, prefix=prefix)
        self.started.append(server)
        if port is not None:
            server.wait_port(port)
        return server

    def stop_all(self) -> None:
        for server in reversed(self.started):
            with contextlib.suppress(Exception):
                server.stop()
        self.started = []

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def python_server(kind: str, port: int, *extra: str) -> list[str]:
    """The argv of one ``bench.servers`` process."""
    return [sys.executable, "-m", "bench.servers", kind, "--port", str(port), *extra]
