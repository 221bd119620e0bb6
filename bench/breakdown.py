"""
Per-connection cost breakdown: ``python -m bench.breakdown KIND [--runs N] [--seconds S]``.

One ``bench.servers`` process of ``KIND`` (``proxy``: muxtwist's Proxy to
nginx; ``responder-sniff``: the 6-rule sniffing responder; ``responder``:
the same responder direct) under wrk ``Connection: close`` load, pinned as
the benchmarks pin. Each run measures, without a profiler, the server's CPU
microseconds per new connection (CPU seconds from ``/proc`` over
connections served); then ``py-spy record`` samples the same load. Every
sample goes to the phase of the deepest frame of its stack that marks one
(:data:`PHASES`): accept, sniff, backend connect, relay setup, relay (the
request and the answer moved), teardown, timers; the rest is the reactor's
own dispatch. Phase microseconds = the median CPU per connection x the
phase's share of the samples. Results go to ``bench/results/breakdown-KIND.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import _load
from bench._procs import Servers, cpu_seconds, ensure_py_spy, free_port, pinning, python_server
from bench.scenarios import nginx_config

ROOT = Path(__file__).resolve().parent.parent

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?):(?P<line>\d+)\)$")

#: (phase, function pattern, file pattern), in the order a connection meets
#: them; a sample belongs to the phase of the deepest frame matching one.
PHASES: list[tuple[str, str, str]] = [
    ("accept", r"^(Port\.)?doRead$", r"twisted/internet/tcp\.py"),
    ("sniff", r"SniffingFactory\.buildProtocol|SniffingProtocol\.(makeConnection|connectionMade)", r"sniffing"),
    ("sniff", r"SniffingProtocol\.(dataReceived|_evaluate|_respond)|match", r"sniffing|matchers"),
    (
        "relay setup",
        r"SniffingProtocol\._hand_off|_attach|buildProtocolForConnection|Relay\.connectionMade|_try_next|candidates",
        r"sniffing|proxy",
    ),
    (
        "backend connect",
        r"Proxy\._connect|TCP[46]ClientEndpoint|HostnameEndpoint|connectTCP|Connector\.|Client\.|"
        r"_WrappingFactory|_WrappingProtocol|connect_socket|_PendingConnect|DirectTCPEndpoint|"
        r"adoptStreamConnection|_fromConnectedSocket|_Capture",
        r"twisted/internet/|muxtwist/(_connect|transparent|proxy)",
    ),
    (
        "relay setup",
        r"_BackendSide\.connectionMade|_backend_ready|_start_splice|Splice\.(start|__init__)|_link|_linked|"
        r"_attempt_connected|spliceable|registerProducer|_connect_succeeded",
        r"proxy|_splice|tcp",
    ),
    (
        "relay",
        r"Poller\.(doRead|update)|_End\.(doRead|doWrite)|Splice\.(_pump|_flush|_drained|_block|_read)|"
        r"from_client|from_backend",
        r".",
    ),
    # In-process, the winner answering: the responder and Twisted writing its answer.
    ("relay", r"^(Responder\.dataReceived|FileDescriptor\.doWrite|Connection\.writeSomeData)$", r"."),
    (
        "teardown",
        r"connectionLost|_ended|_maybe_end|_end_sniffing|loseConnection|abortConnection|_closeSocket|"
        r"readConnectionLost|_AfterConnectionLost|_backend_eof|_backend_lost|Splice\.stop|Poller\.unregister|"
        r"_unsplice|_stop_timers|_cancel_attempt|"
        r"SniffingFactory\._remove$|connection_ended|_closeWriteConnection|_postLoseConnection|Logger\.|_release",
        r".",
    ),
    ("timers", r"callLater|runUntilCurrent|DelayedCall|Deadline|cancel$|_fire$", r"twisted/internet/base\.py|muxtwist"),
]
_COMPILED = [(phase, re.compile(func), re.compile(path)) for phase, func, path in PHASES]


def _short(path: str) -> str:
    for root in ("muxtwist/", "twisted/", "bench/"):
        at = path.rfind(root)
        if at >= 0:
            return path[at:]
    return path.rsplit("/", 1)[-1]


def phase_of(frames: list[tuple[str, str]]) -> str:
    """The phase of one stack of ``(function, file)`` frames, root first."""
    found = None
    for func, path in frames:
        for phase, f, p in _COMPILED:
            if f.search(func) and p.search(path):
                found = phase
                break
    return found or "reactor and other"


def fold(raw: str) -> tuple[int, Counter[str], Counter[str]]:
    """py-spy raw stacks: total samples, samples per phase, and self samples per leaf function."""
    total = 0
    phases: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame.strip())
            frames.append((m.group("func"), _short(m.group("file"))) if m else (frame.strip(), ""))
        phases[phase_of(frames)] += count
        if frames:
            own[f"{frames[-1][0]} ({frames[-1][1]})"] += count
    return total, phases, own


def measure(kind: str, runs: int, seconds: float, connections: int, rate: int, log: Any) -> dict[str, Any]:
    """Run ``kind`` under new-connection load ``runs`` times: plain, then profiled."""
    py_spy = ensure_py_spy(log)
    if py_spy is None:
        raise SystemExit("py-spy could not be installed")
    server_cpu, load_cpu = pinning()
    workdir = Path(tempfile.mkdtemp(prefix="muxtwist-breakdown-"))
    plain: list[dict[str, float]] = []
    raw = ""
    with Servers(workdir) as servers:
        extra: list[str] = []
        if kind == "proxy":
            http = free_port()
            config = nginx_config(workdir, http)
            argv = ["nginx", "-p", str(workdir), "-c", str(config), "-e", str(workdir / "nginx-error.log")]
            servers.start("nginx", argv, port=http, prefix=load_cpu)
            extra = ["--http-backend", str(http), "--other-backend", str(http)]
        port = free_port()
        server = servers.start(kind, python_server(kind, port, *extra), port=port, prefix=server_cpu)
        url = f"http://127.0.0.1:{port}/"
        _load.wrk(url, seconds=1, connections=connections)
        for run in range(runs):
            before = cpu_seconds([server.pid])
            figures = _load.wrk(url, seconds=seconds, connections=connections, close=True, prefix=load_cpu)
            used = cpu_seconds([server.pid]) - before
            plain.append({
                "conn_s": figures["req_s"],
                "cpu_us_per_conn": used / figures["requests"] * 1e6,
                "server_cpu": used / figures["seconds"],
            })  # fmt: skip
            log(f"  run {run + 1}/{runs}: {plain[-1]}")
            out = workdir / f"raw-{run}.txt"
            spy = subprocess.Popen(
                [py_spy, "record", "--pid", str(server.pid), "--duration", str(int(seconds) + 1), "--rate",
                 str(rate), "--format", "raw", "--nonblocking", "--output", str(out)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(0.3)
            _load.wrk(url, seconds=seconds, connections=connections, close=True, prefix=load_cpu)
            spy.communicate(timeout=seconds + 30)
            if out.exists():
                raw += out.read_text()
    total, phases, own = fold(raw)
    per_conn = statistics.median(r["cpu_us_per_conn"] for r in plain)
    return {
        "kind": kind,
        "runs": plain,
        "cpu_us_per_conn": per_conn,
        "conn_s": statistics.median(r["conn_s"] for r in plain),
        "samples": total,
        "phases": {p: {"share": n / total, "us": per_conn * n / total} for p, n in phases.most_common()}
        if total
        else {},
        "self_top": {k: n / total for k, n in own.most_common(30)} if total else {},
        "raw": raw,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.breakdown", description=__doc__)
    parser.add_argument("kind", choices=["proxy", "responder-sniff", "responder"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    options = parser.parse_args(argv)

    def log(message: str) -> None:
        sys.stderr.write(f"[breakdown {time.strftime('%H:%M:%S')}] {message}\n")

    result = measure(options.kind, options.runs, options.seconds, options.connections, options.rate, log)
    options.results.mkdir(parents=True, exist_ok=True)
    path = options.results / f"breakdown-{options.kind}.json"
    raw = result.pop("raw")
    path.write_text(json.dumps(result, indent=2) + "\n")
    (options.results / f"breakdown-{options.kind}-stacks.txt").write_text(raw)
    print(f"{options.kind}: {result['cpu_us_per_conn']:.1f} us CPU per connection, {result['samples']} samples")
    for phase, value in result["phases"].items():
        print(f"  {phase:20s} {value['share']:6.1%} {value['us']:7.1f} us")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
