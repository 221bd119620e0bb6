"""
Backends that fail: refused, black-holed, reset mid-stream, reading slowly,
killed during a transfer, killed while we shut down. The clients reach them
through ``Proxy`` rules (``BACKEND <name>\\n`` picks the backend).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from tests.processes import stop_group
from tests.reliability.harness import MuxServer, Row, Sampler, all_ok, mux_server, outcomes, run_client, shed
from tests.twistd import ROOT

__all__ = ["backend_faults"]

CONNECT_TIMEOUT = 1.0
#: How late after the event a client's connection may be closed on a loaded 2-CPU machine.
SLACK = 1.5


class Backend:
    """A ``tests.reliability.backend`` child process."""

    def __init__(self, mode: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.backend", mode, *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.kill()
            raise RuntimeError(f"backend {mode} did not start: {line!r}")
        self.port = int(line.split()[1])

    def kill(self) -> None:
        stop_group(self.proc)


@contextmanager
def _black_hole() -> Iterator[int]:
    """A listening socket whose accept queue is full: connects to it hang until they time out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _via(backend: str, name: str, count: int, size: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "echo",
        "count": count,
        "opener": f"BACKEND {backend}\n".encode().hex(),
        "size": size,
        "seed": len(name),
        "expect": "echo",
        **extra,
    }


def _ended_within(g: dict[str, Any], limit: float) -> bool:
    return "unfinished" not in g["outcomes"] and g["max"] is not None and g["max"] <= limit


def _refused_and_black_holed(server: MuxServer) -> list[Row]:
    groups = [
        _via("refused", "refused", 200, expect=None),
        _via("blackhole", "blackhole", 50, expect=None),
        _via("echo", "healthy", 200, 8192),
    ]
    r = run_client(server.port, groups, deadline=30)
    leaks = server.leaks()
    refused, hole, healthy = r["refused"], r["blackhole"], r["healthy"]
    return [
        Row(
            "Backend refused",
            "a Proxy rule whose backend port is closed; meanwhile clients of a healthy backend",
            "200 connections, with 200 to the healthy backend",
            f"{shed(refused)} within {refused['max']:.2f} s; healthy: {outcomes(healthy)}; {leaks}",
            all_ok(refused) and refused["max"] <= SLACK and all_ok(healthy) and leaks.ok,
        ),
        Row(
            "Backend black-holed",
            f"a backend whose accept queue is full, so connects hang (connect_timeout {CONNECT_TIMEOUT:g} s)",
            "50 connections, with 200 to a healthy backend",
            f"{shed(hole)} after {hole['min']:.2f}-{hole['max']:.2f} s; healthy: {outcomes(healthy)}; {leaks}",
            all_ok(hole) and hole["max"] <= CONNECT_TIMEOUT + SLACK and all_ok(healthy) and leaks.ok,
        ),
    ]


def _reset(server: MuxServer) -> Row:
    groups = [_via("reset", "reset", 50, 1 << 20, chunk=16384, delay=0.01), _via("echo", "healthy", 100, 8192)]
    r = run_client(server.port, groups, deadline=30)
    leaks = server.leaks()
    reset = r["reset"]
    return Row(
        "Backend reset mid-stream",
        "a backend that resets each connection after echoing 64 KiB of a 1 MiB upload",
        "50 connections, with 100 to a healthy backend",
        f"{outcomes(reset)}: every client's connection ended within {reset['max']:.2f} s, none hung; "
        f"healthy: {outcomes(r['healthy'])}; {leaks}",
        reset["outcomes"].get("ok", 0) == 0 and _ended_within(reset, 30) and all_ok(r["healthy"]) and leaks.ok,
    )


def _slow_reader(server: MuxServer) -> Row:
    rss0 = server.state()["rss_kib"]
    with Sampler(server.pid) as sampler:
        r = run_client(server.port, [_via("slow", "slow", 10, 4 << 20)], deadline=60)
    leaks = server.leaks()
    grown = sampler.peak_rss - rss0
    bound = 10 * 1024  # KiB: 1 MiB per relay would already mean buffering far past the socket buffers
    return Row(
        "Backend slow reader",
        "a backend that reads nothing for 3 s while each client pushes 4 MiB as fast as it can, then echoes it all",
        "10 connections, 40 MiB each way",
        f"{outcomes(r['slow'])} (sha256-checked); server memory grew {grown} KiB at most (bound {bound} KiB: "
        f"backpressure, not buffering); {leaks}",
        all_ok(r["slow"]) and grown <= bound and leaks.ok,
    )


def _killed(server: MuxServer, victim: Backend) -> Row:
    killed: list[float] = []

    def on_event(event: dict[str, Any]) -> None:
        if not killed:
            killed.append(time.monotonic())
            victim.kill()

    r = run_client(
        server.port, [_via("victim", "victim", 20, 2 << 20, chunk=16384, delay=0.02)], deadline=30, on_event=on_event
    )
    leaks = server.leaks()
    g = r["victim"]
    after = g["last_end"] - killed[0] if killed and g["last_end"] else float("nan")
    return Row(
        "Backend killed during a transfer",
        "SIGKILL to the backend process while 20 paced 2 MiB transfers run through it",
        "20 connections",
        f"{outcomes(g)}; every client's connection ended at most {after:.2f} s after the kill; {leaks}",
        bool(killed) and g["outcomes"].get("ok", 0) == 0 and _ended_within(g, 30) and after <= SLACK and leaks.ok,
    )


def _killed_during_shutdown(server: MuxServer, victim: Backend) -> Row:
    marks: dict[str, float] = {}

    def on_event(event: dict[str, Any]) -> None:
        if "term" not in marks:
            marks["term"] = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            marks["kill"] = time.monotonic()
            victim.kill()

    r = run_client(
        server.port, [_via("victim2", "victim2", 20, 2 << 20, chunk=16384, delay=0.02)], deadline=30, on_event=on_event
    )
    code = server.proc.wait(30)
    took = time.monotonic() - marks["kill"] if marks else float("nan")
    g = r["victim2"]
    return Row(
        "Backend killed during our shutdown",
        "SIGTERM to muxtwist (shutdown_timeout 10 s) with 20 proxied transfers in flight, then SIGKILL to their "
        "backend 0.3 s later: the relays end, so the stop need not wait for the timeout",
        "20 connections, one stop",
        f"{outcomes(g)}; muxtwist exited {code} {took:.2f} s after the backend died",
        bool(marks) and code == 0 and took <= SLACK + 1 and "unfinished" not in g["outcomes"],
    )


def backend_faults() -> list[Row]:
    """Refused, black-holed, reset, slow, killed and killed-at-shutdown backends, behind Proxy rules."""
    with ExitStack() as stack:
        started: dict[str, Backend] = {}
        for name, mode in (
            ("echo", "echo"),
            ("reset", "reset"),
            ("slow", "slow"),
            ("victim", "echo"),
            ("victim2", "echo"),
        ):
            started[name] = Backend(mode)
            stack.callback(started[name].kill)
        backends = {n: started[n] for n in ("echo", "reset", "slow")}
        victims = {n: started[n] for n in ("victim", "victim2")}
        hole = stack.enter_context(_black_hole())
        ports = {name: b.port for name, b in {**backends, **victims}.items()}
        ports["refused"], ports["blackhole"] = _closed_port(), hole
        env = {
            "MUXREL_BACKENDS": json.dumps({n: f"tcp:host=127.0.0.1:port={p}" for n, p in ports.items()}),
            "MUXREL_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT),
            "MUXREL_SHUTDOWN_TIMEOUT": "10",
        }
        server = stack.enter_context(mux_server(env))
        # The slow reader goes first, so that its memory figure is not hidden
        # in what earlier phases left allocated.
        slow = _slow_reader(server)
        rows = _refused_and_black_holed(server)
        rows.append(_reset(server))
        rows.append(slow)
        rows.append(_killed(server, victims["victim"]))
        rows.append(_killed_during_shutdown(server, victims["victim2"]))
    return rows
