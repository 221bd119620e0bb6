"""
6. UDP: request/response datagrams through ``UDPProxy`` against the client
straight to the backend, a ``socat`` UDP relay and nginx ``stream`` UDP
proxying, measured interleaved like the other scenarios.

This module is also the two processes of the scenario (``python -m
bench.udp echo --port N``: the backend, answering every datagram with
itself; ``python -m bench.udp load --port N ...``: the load generator, which
prints one JSON line of figures).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import _load
from bench._procs import Server, Servers, cpu_seconds, free_port
from bench._results import Metric, Scenario, Target

#: Where Debian's nginx keeps its dynamic modules (the stream module: libnginx-mod-stream).
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")

FLOWS = 16
IN_FLIGHT = 8

UDP_METRICS = [
    Metric("load_rt_s", f"round trips ({FLOWS} flows x {IN_FLIGHT} in flight)", "datagrams answered/s"),
    Metric("load_p50_ms", "latency p50 under load", "ms", higher_is_better=False),
    Metric("load_p99_ms", "latency p99 under load", "ms", higher_is_better=False),
    Metric("ping_p50_ms", "latency p50 (1 flow, 1 in flight)", "ms", higher_is_better=False),
    Metric("ping_p99_ms", "latency p99 (1 flow, 1 in flight)", "ms", higher_is_better=False),
    Metric("load_cpu_10k", "proxy CPU per 10k round trips", "CPU s", higher_is_better=False),
    Metric("load_lost", "requests lost (no answer within 1 s)", "datagrams", higher_is_better=False),
    Metric("load_loadgen_cpu", "load gen + backend CPU", "share of a core", higher_is_better=False),
    Metric("load_foreign_cpu", "other processes' CPU", "cores", higher_is_better=False),
]

TARGETS = [
    Target("udp", "load_rt_s", "muxtwist UDPProxy", "nginx stream", ">=", 1.0,
           "6. UDP round trips/s through UDPProxy ≥ nginx stream"),
]  # fmt: skip


# --- the datagrams ---------------------------------------------------------


def query(seq: int) -> bytes:
    """A DNS query for ``q<seq in 12 hex digits>.bench.test`` (42 bytes): the rules route it by DNS()."""
    return (
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        + b"\x0dq"
        + b"%012x" % (seq & 0xFFFFFFFFFFFF)
        + b"\x05bench\x04test\x00\x00\x01\x00\x01"
    )


def seq_of(datagram: bytes) -> int | None:
    try:
        return int(datagram[14:26], 16)
    except ValueError:
        return None


# --- the backend -----------------------------------------------------------


def echo_main(port: int) -> None:
    """Answer every datagram with itself, as fast as one blocking loop can."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("127.0.0.1", port))
    recvfrom, sendto = s.recvfrom, s.sendto
    while True:
        data, addr = recvfrom(65535)
        with contextlib.suppress(OSError):
            sendto(data, addr)


# --- the Python floor ------------------------------------------------------


def floor_main(port: int, backend: int) -> None:
    """
    The least a Python relay can do for the same work as ``UDPProxy``: one
    ``epoll`` loop, the listening socket drained to ``EAGAIN``, a connected
    non-blocking socket per flow to the backend, replies sent from the
    listening socket with ``sendto``; no framework, no sniffing, no counters,
    no timeouts, no error handling. Its figures are what CPython and this
    machine allow for the four system calls of a round trip.
    """
    listening = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listening.bind(("127.0.0.1", port))
    listening.setblocking(False)
    poller = select.epoll()
    poller.register(listening.fileno(), select.EPOLLIN)
    flows: dict[Any, Any] = {}  # client address -> its backend socket's send
    replies: dict[int, Any] = {}  # backend socket's descriptor -> reads one reply and sends it on
    keep: list[socket.socket] = []
    recvfrom, sendto = listening.recvfrom, listening.sendto

    def open_flow(addr: Any) -> Any:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.connect(("127.0.0.1", backend))
        keep.append(s)
        recv = s.recv

        def reply() -> None:
            sendto(recv(65535), addr)

        replies[s.fileno()] = reply
        poller.register(s.fileno(), select.EPOLLIN)
        return s.send

    listening_fd = listening.fileno()
    while True:
        for fd, _ in poller.poll():
            if fd != listening_fd:
                with contextlib.suppress(OSError):
                    replies[fd]()
                continue
            while True:
                try:
                    data, addr = recvfrom(65535)
                except BlockingIOError:
                    break
                send = flows.get(addr)
                if send is None:
                    send = flows[addr] = open_flow(addr)
                with contextlib.suppress(OSError):
                    send(data)


# --- the load generator ----------------------------------------------------


def load_main(port: int, flows: int, in_flight: int, seconds: float, warmup: float) -> dict[str, float]:
    """
    ``flows`` connected sockets (one flow each), each keeping ``in_flight``
    requests outstanding; a request unanswered after 1 s counts as lost and
    is replaced. Figures are taken after ``warmup`` seconds.
    """
    poller = select.epoll()
    socks: dict[int, socket.socket] = {}
    pending: dict[int, dict[int, int]] = {}
    for _ in range(flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        socks[s.fileno()] = s
        pending[s.fileno()] = {}
        poller.register(s.fileno(), select.EPOLLIN)
    seq = 0
    clock = time.perf_counter_ns

    def send(fd: int) -> None:
        nonlocal seq
        seq += 1
        pending[fd][seq] = clock()
        with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
            socks[fd].send(query(seq))

    # The first request of each flow alone, so that every proxy has set the flow up.
    for fd in socks:
        send(fd)
    for fd in socks:
        for _ in range(in_flight - 1):
            send(fd)
    latencies: list[int] = []
    answered = lost = 0
    started = time.monotonic()
    measuring = False
    end = started + warmup + seconds
    next_sweep = started + 0.1
    cpu_before = os.times()
    while True:
        now = time.monotonic()
        if not measuring and now >= started + warmup:
            measuring, latencies, answered, lost = True, [], 0, 0
            measure_start, cpu_before = now, os.times()
        if now >= end:
            break
        for fd, _ in poller.poll(0.05):
            s, sent = socks[fd], pending[fd]
            while True:
                try:
                    data = s.recv(4096)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                sent_at = sent.pop(seq_of(data) or 0, None)
                if sent_at is None:
                    continue  # late, after being counted lost
                latencies.append(clock() - sent_at)
                answered += 1
                send(fd)
        if now >= next_sweep:
            next_sweep = now + 0.1
            limit = clock() - 1_000_000_000
            for fd, sent in pending.items():
                old = [k for k, t in sent.items() if t < limit]
                for k in old:
                    del sent[k]
                    lost += 1
                    send(fd)
    wall = time.monotonic() - measure_start
    cpu_after = os.times()
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p))] / 1e6 if latencies else 0.0

    return {
        "rt_s": answered / wall,
        "answered": float(answered),
        "lost": float(lost),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "own_cpu": (cpu_after.user - cpu_before.user + cpu_after.system - cpu_before.system) / wall,
    }


def run_load(port: int, *, flows: int, in_flight: int, seconds: float, prefix: list[str]) -> dict[str, float]:
    argv = [*prefix, sys.executable, "-m", "bench.udp", "load", "--port", str(port)]
    argv += ["--flows", str(flows), "--in-flight", str(in_flight), "--seconds", str(seconds)]
    text, _, _ = _load.run_timed(argv, timeout=seconds + 30)
    try:
        figures: dict[str, float] = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise _load.LoadFailed(f"the UDP load generator gave no figures: {text[-800:]}") from None
    if not figures.get("answered"):
        raise _load.LoadFailed(f"no request was answered: {figures}")
    return figures


# --- the contenders --------------------------------------------------------


def wait_udp(server: Server, port: int, timeout: float = 15.0) -> None:
    """Wait until a query sent to ``port`` comes back (through the contender to the echo backend)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise _load.LoadFailed(f"{server.name} exited:\n{server.log_tail()}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.3)
            try:
                s.sendto(query(0), ("127.0.0.1", port))
                s.recv(4096)
                return
            except OSError:
                pass
    raise _load.LoadFailed(f"{server.name} did not answer on {port}/udp within {timeout}s:\n{server.log_tail()}")


def rules_file(workdir: Path, port: int, backend: int) -> Path:
    """DNS is the third of three UDP rules, so the winning flows were shown to QUIC and WireGuard first."""
    path = workdir / "udp-rules.py"
    path.write_text(
        f"""
from muxtwist import Rule
from muxtwist.actions import UDPProxy
from muxtwist.matchers import DNS, QUIC, WireGuard

backend = "udp:host=127.0.0.1:port={backend}"
listeners = {{
    "udp:{port}:interface=127.0.0.1": [
        Rule(QUIC(sni="h3.test"), UDPProxy(backend)),
        Rule(WireGuard(), UDPProxy(backend)),
        Rule(DNS(), UDPProxy(backend)),
    ],
}}
log_connections = False
"""
    )
    return path


def nginx_udp_config(workdir: Path, port: int, backend: int) -> Path:
    """One worker, as in the other scenarios; UDP sessions kept for the run (no proxy_responses limit)."""
    path = workdir / "nginx-udp.conf"
    path.write_text(
        f"""
load_module {STREAM_MODULE};
daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx-udp.pid;
error_log {workdir}/nginx-udp-error.log;
worker_rlimit_nofile 65536;
events {{ worker_connections 4096; }}
stream {{
    server {{
        listen 127.0.0.1:{port} udp;
        proxy_pass 127.0.0.1:{backend};
        proxy_timeout 60s;
    }}
}}
"""
    )
    return path


def ensure_udp_tools(log: Any) -> list[str]:
    """socat and nginx's stream module, installed with apt-get if missing; returns what is still missing."""
    missing = []
    if shutil.which("socat") is None:
        missing.append("socat")
    if not STREAM_MODULE.exists():
        missing.append("libnginx-mod-stream")
    if missing and shutil.which("apt-get") is not None:
        log(f"installing {' '.join(missing)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=False, env=env, stdout=subprocess.DEVNULL)
    still = []
    if shutil.which("socat") is None:
        still.append("socat")
    if not STREAM_MODULE.exists():
        still.append("nginx stream module")
    return still


def udp(ctx: Any) -> Scenario:
    """UDPProxy vs direct, socat and nginx stream: round trips per second and latency."""
    scenario = Scenario(
        "udp",
        "6. UDP relay: request/response datagrams",
        "direct",
        UDP_METRICS,
        notes=[
            f"Load: one process with {FLOWS} connected UDP sockets (flows), each keeping {IN_FLIGHT} 42-byte DNS "
            "queries outstanding and sending the next when one is answered; a round trip is a query and its "
            "answer (two datagrams through a proxy each way: client to proxy to backend and back). The "
            "backend is a Python loop answering each datagram with itself. Latency under load is measured "
            "on that load; the ping latency with one flow and one query at a time.",
            "muxtwist: `twistd -n muxtwist` with three UDP rules (QUIC by SNI, WireGuard, DNS third) each "
            "to a UDPProxy; nginx: one worker, `stream { listen udp; proxy_pass }`; socat: `UDP4-LISTEN:...,"
            "fork,reuseaddr UDP4:...` (a forked child per flow). Proxies on CPU 0; load generator and "
            "backend on CPU 1. Proxy CPU counts the proxy's processes (socat's children too).",
            "Python floor: `python -m bench.udp floor`, the same relaying as UDPProxy (a connected socket "
            "per flow to the backend, replies with `sendto` from the listening socket) in one bare `epoll` "
            "loop with no framework, sniffing, counters, timeouts or error handling: what CPython on this "
            "machine can do with the four system calls of a round trip.",
        ],
    )
    missing = ensure_udp_tools(ctx.log)
    with Servers(ctx.workdir) as servers:
        backend = free_port()
        echo = servers.start(
            "udp-echo", [sys.executable, "-m", "bench.udp", "echo", "--port", str(backend)], prefix=ctx.load_cpu
        )
        wait_udp(echo, backend)
        contenders: list[tuple[str, int, list[Server]]] = [("direct", backend, [])]
        mux_port = free_port()
        rules = rules_file(ctx.workdir, mux_port, backend)
        twistd = ["twistd", "-n", "--pidfile=", "-l", "-", "muxtwist", "--config", str(rules)]
        mux = servers.start("muxtwist-udp", twistd, prefix=ctx.server_cpu)
        wait_udp(mux, mux_port)
        contenders.append(("muxtwist UDPProxy", mux_port, [mux]))
        floor_port = free_port()
        floor = servers.start(
            "udp-floor",
            [sys.executable, "-m", "bench.udp", "floor", "--port", str(floor_port), "--backend", str(backend)],
            prefix=ctx.server_cpu,
        )
        wait_udp(floor, floor_port)
        contenders.append(("Python floor", floor_port, [floor]))
        if "socat" in missing:
            scenario.skip("socat", "socat is not installed and could not be")
        else:
            socat_port = free_port()
            argv = ["socat", f"UDP4-LISTEN:{socat_port},bind=127.0.0.1,fork,reuseaddr", f"UDP4:127.0.0.1:{backend}"]
            socat = servers.start("socat-udp", argv, prefix=ctx.server_cpu)
            wait_udp(socat, socat_port)
            contenders.append(("socat", socat_port, [socat]))
        if "nginx stream module" in missing:
            scenario.skip("nginx stream", "nginx's stream module is not installed and could not be")
        else:
            nginx_port = free_port()
            config = nginx_udp_config(ctx.workdir, nginx_port, backend)
            argv = ["nginx", "-p", str(ctx.workdir), "-c", str(config), "-e", str(ctx.workdir / "nginx-udp-error.log")]
            nginx = servers.start("nginx-udp", argv, prefix=ctx.server_cpu)
            wait_udp(nginx, nginx_port)
            contenders.append(("nginx stream", nginx_port, [nginx]))
        for name, _, _ in contenders:
            scenario.add(name, {})
        _measure(ctx, scenario, contenders, echo)
    return scenario


def _measure(ctx: Any, scenario: Scenario, contenders: list[tuple[str, int, list[Server]]], echo: Server) -> None:
    from bench._procs import machine_busy

    for run in range(ctx.runs):
        for label, flows, in_flight in (("load", FLOWS, IN_FLIGHT), ("ping", 1, 1)):
            for name, port, measured in contenders:
                if any(not s.alive() for s in [*measured, echo]):
                    scenario.notes.append(f"{name}: a server process died; later runs skipped")
                    continue
                ctx.log(f"  run {run + 1}/{ctx.runs} {label}: {name}")
                pids = [s.pid for s in measured]
                busy, before, theirs = machine_busy(), cpu_seconds(pids), cpu_seconds([echo.pid])
                start = time.monotonic()
                try:
                    figures = run_load(port, flows=flows, in_flight=in_flight, seconds=ctx.seconds, prefix=ctx.load_cpu)
                except _load.LoadFailed as e:
                    scenario.notes.append(f"run {run + 1} {label} of {name} failed: {str(e)[:300]}")
                    continue
                wall = time.monotonic() - start
                used = cpu_seconds(pids) - before if pids else 0.0
                echo_used = cpu_seconds([echo.pid]) - theirs
                out = {"p50_ms": figures["p50_ms"], "p99_ms": figures["p99_ms"]}
                if label == "load":
                    out["rt_s"] = figures["rt_s"]
                    out["lost"] = figures["lost"]
                    out["loadgen_cpu"] = figures["own_cpu"] + echo_used / wall
                    # CPU the machine spent outside the proxy, the backend and the load generator.
                    elsewhere = (machine_busy() - busy - used - echo_used) / wall - figures["own_cpu"]
                    out["foreign_cpu"] = max(0.0, elsewhere)
                    if pids:
                        out["server_cpu"] = used / wall
                        out["cpu_10k"] = used / wall / figures["rt_s"] * 10_000
                scenario.add(name, {f"{label}_{k}": v for k, v in out.items()})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.udp")
    parser.add_argument("role", choices=["echo", "floor", "load"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", type=int, help="floor: the backend's port")
    parser.add_argument("--flows", type=int, default=FLOWS)
    parser.add_argument("--in-flight", type=int, default=IN_FLIGHT)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    options = parser.parse_args(argv)
    if options.role == "echo":
        echo_main(options.port)
        return
    if options.role == "floor":
        floor_main(options.port, options.backend)
        return
    figures = load_main(options.port, options.flows, options.in_flight, options.seconds, options.warmup)
    sys.stdout.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    main()
