"""
Load generators: wrk for HTTP, iperf3 for bulk bytes, and a small TLS
handshake client. Each run reports its own CPU seconds (from ``wait4``), so
the harness can tell whether the load generator was the bottleneck.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


class LoadFailed(RuntimeError):
    """A load generator failed to produce figures."""


def run_timed(argv: Sequence[str], timeout: float) -> tuple[str, float, float]:
    """Run ``argv``; return its output, wall seconds and CPU seconds (user + system)."""
    with tempfile.TemporaryFile() as out:
        start = time.monotonic()
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.01)
        wall = time.monotonic() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if process.returncode != 0:
        raise LoadFailed(f"{argv[0]} exited with {process.returncode}: {text[-800:]}")
    return text, wall, usage.ru_utime + usage.ru_stime


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(text: str) -> dict[str, float]:
    """Requests/s, request count, latency percentiles (ms) and errors from wrk's report."""
    found = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if found is None:
        raise LoadFailed(f"no Requests/sec in wrk output: {text[-800:]}")
    result = {"req_s": float(found.group(1))}
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if total:
        result["requests"] = float(total.group(1))
        result["seconds"] = _ms(total.group(2), total.group(3)) / 1000
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M):
        result[f"p{pct}_ms"] = _ms(value, unit)
    errors = 0.0
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if socket_errors:
        # Read errors are how wrk counts the server closing after Connection: close.
        errors += float(socket_errors.group(1)) + float(socket_errors.group(3)) + float(socket_errors.group(4))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non_2xx:
        errors += float(non_2xx.group(1))
    result["errors"] = errors
    return result


def wrk(
    url: str,
    *,
    seconds: float,
    connections: int,
    close: bool = False,
    latency: bool = False,
    prefix: Sequence[str] = (),
) -> dict[str, float]:
    """One wrk run with one thread; adds ``loadgen_cpu`` (its CPU share of one core)."""
    argv = [*prefix, "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    if latency:
        argv.append("--latency")
    argv.append(url)
    text, wall, cpu = run_timed(argv, timeout=seconds + 30)
    result = parse_wrk(text)
    result["loadgen_cpu"] = cpu / wall if wall else 0.0
    return result


def iperf3(port: int, *, seconds: float, prefix: Sequence[str] = ()) -> dict[str, float]:
    """One iperf3 client run to ``port``: received MB/s and the client's CPU share."""
    argv = [*prefix, "iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(max(1, round(seconds))), "-J"]
    text, wall, cpu = run_timed(argv, timeout=seconds + 30)
    try:
        report = json.loads(text)
        bits = report["end"]["sum_received"]["bits_per_second"]
    except (ValueError, KeyError) as e:
        raise LoadFailed(f"iperf3 gave no figures ({e}): {text[-800:]}") from None
    return {"mb_s": bits / 8 / 1e6, "loadgen_cpu": cpu / wall if wall else 0.0}


def tls_handshakes(
    port: int, *, seconds: float, sni: str, concurrency: int = 2, prefix: Sequence[str] = ()
) -> dict[str, float]:
    """Full TLS handshakes (each with one small HTTP request) per second, from ``bench.tlsclient``."""
    argv = [
        *prefix,
        sys.executable,
        "-m",
        "bench.tlsclient",
        "--port",
        str(port),
        "--seconds",
        str(seconds),
        "--sni",
        sni,
        "--concurrency",
        str(concurrency),
    ]
    text, wall, cpu = run_timed(argv, timeout=seconds + 30)
    try:
        report: dict[str, Any] = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise LoadFailed(f"tls client gave no figures: {text[-800:]}") from None
    return {
        "handshakes_s": float(report["handshakes_s"]),
        "errors": float(report["errors"]),
        "loadgen_cpu": cpu / wall if wall else 0.0,
    }
