"""
Stopping and reloading a loaded server: SIGTERM with transfers in flight,
and SIGHUP over and over while clients keep connecting.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from tests.reliability.harness import Row, all_ok, mux_server, outcomes, run_client
from tests.reliability.openers import OPENERS

__all__ = ["reload_under_load", "shutdown_under_load"]

SHUTDOWN_TIMEOUT = 4.0


def _echo(name: str, count: int, size: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "echo",
        "count": count,
        "opener": OPENERS[extra.pop("protocol", "prefix")].hex(),
        "size": size,
        "seed": len(name),
        **extra,
    }


def shutdown_under_load() -> Row:
    """SIGTERM once 100 paced 256 KiB transfers are under way: they finish intact, the rest is cut, exit 0."""
    env = {"MUXREL_SNIFF_TIMEOUT": "30", "MUXREL_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT)}
    with mux_server(env) as server:
        groups = [
            # About 1 s of sending each: can finish within shutdown_timeout.
            _echo("finishing", 100, 256 << 10, expect="prefix", chunk=16384, delay=0.06, barrier="go"),
            # About 8 s each: cannot; must be cut at shutdown_timeout.
            _echo("endless", 10, 2 << 20, expect="prefix", chunk=16384, delay=0.06, barrier="go"),
            # Still sniffing at the stop: aborted at once.
            {"name": "sniffing", "kind": "hold", "count": 50, "hold_max": 20},
        ]
        signalled: list[float] = []

        def on_event(event: dict[str, Any]) -> None:
            if event["group"] == "finishing" and not signalled:
                signalled.append(time.monotonic())
                server.proc.send_signal(signal.SIGTERM)

        r = run_client(server.port, groups, deadline=SHUTDOWN_TIMEOUT + 20, on_event=on_event)
        code = server.proc.wait(SHUTDOWN_TIMEOUT + 20)
        exited = time.monotonic()
        log = server.log_text()
    took = exited - signalled[0] if signalled else float("nan")
    finishing, endless, sniffing = r["finishing"], r["endless"], r["sniffing"]
    cut = endless["outcomes"].get("ok", 0) == 0 and "unfinished" not in endless["outcomes"]
    green = (
        bool(signalled)
        and all_ok(finishing)
        and cut
        and sniffing["outcomes"] == {"closed": sniffing["count"]}
        and code == 0
        and took <= SHUTDOWN_TIMEOUT + 2.0
        and "aborting 10 connection(s)" in log
    )
    return Row(
        "Shutdown under load",
        f"SIGTERM to twistd muxtwist (shutdown_timeout {SHUTDOWN_TIMEOUT:g} s) as soon as 100 paced 256 KiB echo "
        "transfers (16 KiB every 60 ms) are routed, with 10 transfers of 2 MiB at the same pace (8 s long) "
        "and 50 connections still sniffing",
        "160 connections, one stop",
        f"256 KiB transfers: {outcomes(finishing)} (sha256-checked, longest {finishing['max']:.2f} s); "
        f"2 MiB transfers: {outcomes(endless)} "
        f"(cut at the timeout); sniffing: {outcomes(sniffing)} after at most {sniffing['max']:.2f} s; "
        f"exit {code} {took:.2f} s after SIGTERM",
        green,
    )


def reload_under_load() -> Row:
    """SIGHUP every 100 ms for 4 s while 1,000 clients connect over 5 protocols: none fails."""
    protocols = ["http1", "tls", "ssh", "redis", "prefix"]
    with mux_server({"MUXREL_SNIFF_TIMEOUT": "10"}) as server:
        groups = [
            _echo(p, 200, 8192, protocol=p, expect=p, spacing=0.02, start_at=i * 0.004) for i, p in enumerate(protocols)
        ]
        groups.append(_echo("long", 20, 1 << 20, expect="prefix", chunk=16384, delay=0.05))
        stop = threading.Event()
        sent = [0]

        def hup() -> None:
            while not stop.wait(0.1):
                server.proc.send_signal(signal.SIGHUP)
                sent[0] += 1

        thread = threading.Thread(target=hup, daemon=True)
        thread.start()
        try:
            r = run_client(server.port, groups, deadline=60)
        finally:
            stop.set()
            thread.join(5)
        leaks = server.leaks()
        code = server.stop()
        reloaded = server.log_text().count("reloaded ")
    total = sum(g["count"] for g in r.values())
    bad = {n: outcomes(g) for n, g in r.items() if not all_ok(g)}
    return Row(
        "Reload under load",
        f"SIGHUP every 100 ms while clients of {len(protocols)} protocols connect (8 KiB echoed each) "
        "and 20 paced 1 MiB transfers run across the reloads",
        f"{sent[0]} SIGHUPs, {reloaded} reloads logged, {total} connections",
        ("0 failed connections" if not bad else f"failures: {bad}") + f"; {leaks}; exit {code}",
        not bad and reloaded >= sent[0] // 2 and sent[0] >= 10 and leaks.ok and code == 0,
    )
