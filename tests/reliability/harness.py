"""
What every scenario needs: a ``twistd muxtwist`` server on the reliability
rules with its settings, the load driver as a child process, and the leak
check (open descriptors and pending delayed calls back to their baseline).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import attrs

from tests.processes import stop_group
from tests.twistd import ROOT, free_port, twistd_command, wait_for_port

__all__ = [
    "Leaks",
    "MuxServer",
    "Row",
    "Sampler",
    "all_ok",
    "diag",
    "fd_count",
    "mux_server",
    "outcomes",
    "rss_kib",
    "run_client",
    "shed",
]

#: The listen backlog. Twisted's default of 50 overflows when thousands of
#: clients connect within a second, and the kernel then drops SYNs, which
#: clients retry only after a second: latency that is not muxtwist's.
BACKLOG = 1024

RULES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rules_mux.py")


@attrs.frozen
class Row:
    """One line of docs/reliability.md: a scenario, what was tried, how many times, what happened."""

    name: str
    tried: str
    times: str
    result: str
    green: bool
    seconds: float = 0.0
    #: The figure measured, for the rows of the hostile clients table.
    figure: str = ""
    #: Which table of the page the row goes in: ``""`` (scenarios) or ``"hostile"``.
    table: str = ""


def fd_count(pid: int) -> int:
    """How many descriptors process ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    """The resident memory of process ``pid``, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def diag(port: int, timeout: float = 5.0, preamble: bytes = b"") -> dict[str, int]:
    """Ask the server on ``port`` for its diagnostics (descriptors, delayed calls, memory)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(preamble + b"DIAG\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    result: dict[str, int] = json.loads(data)
    return result


class MuxServer:
    """A ``twistd muxtwist`` child serving the reliability rules on one port, its log in a file."""

    def __init__(self, env: Mapping[str, str] | None = None, rules: str = RULES, args: Sequence[str] = ()) -> None:
        self.port = free_port()
        # A listener that trusts 127.0.0.1 to send PROXY headers requires one.
        trusted = (env or {}).get("MUXREL_TRUST", "")
        self.preamble = b"PROXY UNKNOWN\r\n" if "127." in trusted else b""
        self.log = tempfile.NamedTemporaryFile(prefix="muxrel-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            twistd_command(
                "--port", f"tcp:{self.port}:interface=127.0.0.1:backlog={BACKLOG}", "--config", rules, *args
            ),
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        try:
            wait_for_port(self.port, self.proc, timeout=30.0)
            # wait_for_port's own probe connection must be gone from the baseline.
            self.baseline = self.settled({}, timeout=5.0)
        except BaseException as e:
            log = self.log_text()
            self.kill()
            raise RuntimeError(f"muxtwist did not start: {e}; its log:\n{log[-3000:]}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def state(self) -> dict[str, int]:
        """Descriptors counted from outside, delayed calls and memory as the server reports them."""
        # Count before asking: the diagnostics connection itself closes a
        # moment after its answer, and must not be counted.
        fds = fd_count(self.pid)
        d = diag(self.port, preamble=self.preamble)
        return {"fds": fds, "delayed_calls": d["delayed_calls"], "rss_kib": rss_kib(self.pid)}

    def settled(self, baseline: Mapping[str, int], timeout: float = 10.0) -> dict[str, int]:
        """Poll until descriptors and delayed calls are back to ``baseline`` (or stop changing), or time runs out."""
        deadline = time.monotonic() + timeout
        last: dict[str, int] = {}
        while True:
            now = self.state()
            back = baseline and all(now[k] <= baseline[k] for k in ("fds", "delayed_calls"))
            steady = not baseline and last and all(now[k] == last[k] for k in ("fds", "delayed_calls"))
            if back or steady or time.monotonic() > deadline:
                return now
            last = now
            time.sleep(0.1)

    def leaks(self, timeout: float = 10.0) -> Leaks:
        """The leak check: descriptors and delayed calls against the baseline taken at start."""
        return Leaks(self.baseline, self.settled(self.baseline, timeout))

    def log_text(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait, and return the exit code (killed after ``timeout``: -9)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        stop_group(self.proc)
        self.log.close()
        if os.path.exists(self.log.name):
            os.unlink(self.log.name)


@attrs.frozen
class Leaks:
    """Descriptors and delayed calls before a scenario and after it settled."""

    before: Mapping[str, int]
    after: Mapping[str, int]

    @property
    def ok(self) -> bool:
        return all(self.after[k] <= self.before[k] for k in ("fds", "delayed_calls"))

    def __str__(self) -> str:
        return (
            f"fds {self.before['fds']}->{self.after['fds']}, "
            f"delayed calls {self.before['delayed_calls']}->{self.after['delayed_calls']}"
        )


@contextmanager
def mux_server(
    env: Mapping[str, str] | None = None, rules: str = RULES, args: Sequence[str] = ()
) -> Iterator[MuxServer]:
    """A :class:`MuxServer` (on ``rules``, a rules file), always killed at the end."""
    server = MuxServer(env, rules, args)
    try:
        yield server
    finally:
        server.kill()


def run_client(
    port: int,
    groups: list[dict[str, Any]],
    *,
    deadline: float = 60.0,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the load driver against ``port``; return each group's summary by name."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.client"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"port": port, "groups": groups, "deadline": deadline}))
        proc.stdin.close()
        result: dict[str, Any] | None = None
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "done":
                result = event
            elif on_event is not None:
                on_event(event)
        proc.wait(deadline + 30)
    finally:
        stop_group(proc)
    if result is None:
        raise RuntimeError(f"load driver exited {proc.returncode} without a result")
    return {g["name"]: g for g in result["groups"]}


def outcomes(summary: Mapping[str, Any]) -> str:
    """``ok 1000`` or ``ok 998, misrouted:tls 2``."""
    return ", ".join(f"{k} {v}" for k, v in sorted(summary["outcomes"].items()))


def all_ok(summary: Mapping[str, Any]) -> bool:
    """Whether every connection of a group ended ``ok``."""
    return bool(summary["outcomes"].get("ok", 0) == summary["count"])


class Sampler:
    """Sample a process's resident memory and open descriptors every 20 ms in a thread; keep the peaks."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid = pid
        self.peak_rss = rss_kib(pid)
        self.peak_fds = fd_count(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak_rss = max(self.peak_rss, rss_kib(self.pid))
                self.peak_fds = max(self.peak_fds, fd_count(self.pid))
            except OSError:
                return

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def shed(summary: Mapping[str, Any]) -> str:
    """For a group the server must close unrouted: ``200/200 closed unrouted`` (and what else happened)."""
    ok = summary["outcomes"].get("ok", 0)
    rest = {k: v for k, v in summary["outcomes"].items() if k != "ok"}
    return f"{ok}/{summary['count']} closed unrouted" + (f" ({rest})" if rest else "")
