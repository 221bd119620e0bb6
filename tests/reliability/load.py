"""
Scenarios of ordinary traffic done hard: many protocols at once through one
port, and every protocol's real client bytes dribbled one at a time.
"""

from __future__ import annotations

import time

from muxtwist.matchers.http2 import GRPC, SETTINGS_FRAME
from tests.reliability.harness import Row, all_ok, mux_server, outcomes, run_client
from tests.reliability.openers import OPENERS

__all__ = ["byte_dribble", "mixed_load"]

PER_PROTOCOL = 100


def mixed_load() -> Row:
    """1,100 connections, 100 per protocol, all open at once, each echoing a sha256-checked payload."""
    sizes = [1024, 4096, 16384, 65536]
    with mux_server({"MUXREL_SNIFF_TIMEOUT": "10"}) as server:
        groups = [
            {
                "name": name,
                "kind": "echo",
                "count": PER_PROTOCOL,
                "opener": opener.hex(),
                "size": sizes[i % len(sizes)],
                "seed": i + 1,
                "expect": name,
                "barrier": "all",
                "spacing": 0.0005,
            }
            for i, (name, opener) in enumerate(OPENERS.items())
        ]
        peak: list[int] = []
        routed: set[str] = set()

        def on_event(event: dict[str, object]) -> None:
            routed.add(str(event["group"]))
            if len(routed) == len(groups):
                peak.append(server.state()["fds"] - server.baseline["fds"])

        result = run_client(server.port, groups, deadline=60.0, on_event=on_event)
        leaks = server.leaks()
        code = server.stop()
    total = sum(g["count"] for g in result.values())
    ok = sum(g["outcomes"].get("ok", 0) for g in result.values())
    bad = {name: outcomes(g) for name, g in result.items() if not all_ok(g)}
    sent = sum(g["bytes_sent"] for g in result.values())
    green = not bad and leaks.ok and code == 0 and total >= 1000 and bool(peak) and peak[0] >= 1000
    return Row(
        "Mixed load",
        f"{len(groups)} protocols ({', '.join(groups_names(groups))}) through one port; every connection open "
        "at once before any payload is sent; payloads of 1-64 KiB echoed and checked by sha256",
        f"{total} concurrent connections, {sent / 1e6:.1f} MB sent",
        f"{ok}/{total} intact, {total - ok} misrouted/lost/corrupt"
        + (f" ({bad})" if bad else "")
        + f"; server held {peak[0] if peak else '?'} extra descriptors at the peak; {leaks}; exit {code}",
        green,
    )


def groups_names(groups: list[dict[str, object]]) -> list[str]:
    return [str(g["name"]) for g in groups]


def byte_dribble() -> Row:
    """Every real client capture sent one byte every 2 ms, all interleaved, each to its own service."""
    from tests.captures import all_captures

    started = time.monotonic()
    captures = [c for c in all_captures() if c.data]
    capture_time = time.monotonic() - started
    with mux_server({"MUXREL_SNIFF_TIMEOUT": "30"}) as server:
        groups = [
            {
                "name": c.label,
                "kind": "echo",
                "count": 2,
                "opener": c.data.hex(),
                "seed": i,
                "chunk": 1,
                "delay": 0.002,
                "expect": c.protocol,
                # The gRPC rule answers an HTTP/2 preface with SETTINGS and
                # drops the client's ACK from the replay.
                "strip": SETTINGS_FRAME.hex() if c.protocol in ("grpc", "http2") else "",
                "reply": (GRPC().filter_replay(c.data) if c.protocol in ("grpc", "http2") else c.data).hex(),
            }
            for i, c in enumerate(captures)
        ]
        # Ordinary clients of every protocol come and go meanwhile.
        background = [
            {
                "name": f"background-{name}",
                "kind": "echo",
                "count": 20,
                "opener": opener.hex(),
                "size": 4096,
                "seed": 100 + i,
                "expect": name,
                "spacing": 0.05,
            }
            for i, (name, opener) in enumerate(OPENERS.items())
        ]
        result = run_client(server.port, groups + background, deadline=90.0)
        leaks = server.leaks()
        code = server.stop()
    bad = {name: outcomes(g) for name, g in result.items() if not all_ok(g)}
    protocols = sorted({c.protocol for c in captures})
    total = sum(g["count"] for g in result.values())
    longest = max(len(c.data) for c in captures)
    return Row(
        "Byte dribble",
        f"{len(captures)} client captures ({len(protocols)} protocols: {', '.join(protocols)}; "
        f"{sum(c.real for c in captures)} from real clients) sent one byte every 2 ms, twice each, "
        "all interleaved with each other and with ordinary clients of every protocol",
        f"{len(captures) * 2} dribbled connections of up to {longest} bytes, {total - len(captures) * 2} "
        f"ordinary ones alongside (captures taken in {capture_time:.1f}s)",
        f"{total - sum(g['outcomes'].get('ok', 0) for g in result.values())} misrouted or damaged"
        + (f" ({bad})" if bad else "")
        + f"; {leaks}; exit {code}",
        not bad and leaks.ok and code == 0,
    )
