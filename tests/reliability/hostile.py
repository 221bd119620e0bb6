"""
Hostile clients against one server with a short ``sniff_timeout``: slowloris,
oversized heads, a ClientHello declaring a huge length, bad Host headers,
connect-and-close, PROXY headers from peers that may not send them. Legitimate
clients are served all along; their latency is measured during each attack.
"""

from __future__ import annotations

from typing import Any

from muxtwist.matchers.proxy_protocol import build_v1, build_v2
from tests.reliability.harness import MuxServer, Row, Sampler, all_ok, mux_server, outcomes, run_client, shed
from tests.reliability.openers import OPENERS

__all__ = ["hostile_clients", "untrusted_proxy_headers"]

SNIFF_TIMEOUT = 1.0
MAX_SNIFF_BYTES = 16384
#: How late after ``sniff_timeout`` a stalled connection may be closed on a loaded 2-CPU machine.
CLOSE_SLACK = 1.5
#: The p99 latency (s) legitimate clients must keep during an attack, on 2 CPUs shared with the attackers.
LEGIT_P99 = 2.0

_ENV = {"MUXREL_SNIFF_TIMEOUT": str(SNIFF_TIMEOUT), "MUXREL_MAX_SNIFF_BYTES": str(MAX_SNIFF_BYTES)}


def legit(count: int, start_at: float = 0.0, spacing: float = 0.005, seed: int = 7) -> dict[str, Any]:
    """Ordinary HTTP/1.1 clients, each echoing 4 KiB."""
    return {
        "name": "legit",
        "kind": "echo",
        "count": count,
        "opener": OPENERS["http1"].hex(),
        "size": 4096,
        "seed": seed,
        "expect": "http1",
        "start_at": start_at,
        "spacing": spacing,
    }


def _legit_ok(g: dict[str, Any]) -> bool:
    return all_ok(g) and g["p99"] is not None and g["p99"] <= LEGIT_P99


def _legit_text(g: dict[str, Any]) -> str:
    return f"legit clients {outcomes(g)}, p50 {g['p50'] * 1000:.0f} ms, p99 {g['p99'] * 1000:.0f} ms"


def _closed_between(g: dict[str, Any], low: float, high: float) -> bool:
    return bool(
        g["outcomes"].get("closed", 0) + g["outcomes"].get("ok", 0) == g["count"]
        and g["min"] is not None
        and low <= g["min"]
        and g["max"] <= high
    )


def _slowloris(server: MuxServer, baseline_p99: float) -> Row:
    groups = [
        {"name": "silent", "kind": "hold", "count": 1000, "spacing": 0.0005, "hold_max": 10},
        {
            "name": "byte-a-minute",
            "kind": "hold",
            "count": 1000,
            "opener": b"G".hex(),
            "interval": 60,
            "spacing": 0.0005,
            "hold_max": 10,
        },
        legit(400, start_at=0.3),
    ]
    rss0 = server.state()["rss_kib"]
    with Sampler(server.pid) as sampler:
        r = run_client(server.port, groups, deadline=30)
    leaks = server.leaks()
    grown = sampler.peak_rss - rss0
    bound = 2000 * MAX_SNIFF_BYTES // 1024
    hostile_ok = all(_closed_between(r[n], SNIFF_TIMEOUT * 0.9, SNIFF_TIMEOUT + CLOSE_SLACK) for n in r if n != "legit")
    return Row(
        "Hostile: slowloris",
        f"1,000 silent connections and 1,000 sending one byte a minute (sniff_timeout {SNIFF_TIMEOUT:g} s), "
        "while 400 HTTP/1.1 clients come and go",
        "2,000 hostile + 400 legitimate connections",
        f"silent: {outcomes(r['silent'])} after {r['silent']['min']:.2f}-{r['silent']['max']:.2f} s; "
        f"byte-a-minute: {outcomes(r['byte-a-minute'])} after "
        f"{r['byte-a-minute']['min']:.2f}-{r['byte-a-minute']['max']:.2f} s; {_legit_text(r['legit'])} "
        f"(without attack: p99 {baseline_p99 * 1000:.0f} ms); server peaked at {sampler.peak_fds} descriptors "
        f"and +{grown} KiB resident (bound: 2,000 x max_sniff_bytes = {bound} KiB); {leaks}",
        hostile_ok and _legit_ok(r["legit"]) and grown <= bound and leaks.ok,
    )


def _full_buffers(server: MuxServer) -> Row:
    # The start of a ClientHello declaring 65,535 bytes: the TLS rule needs
    # more until MAX_CLIENT_HELLO, so each connection holds almost
    # max_sniff_bytes, and no rule matches it when sniff_timeout ends it.
    head = b"\x16\x03\x01\x40\x00" + b"\x01\x00\xff\xff" + b"\x03\x03"
    opener = head + bytes(MAX_SNIFF_BYTES - 1 - len(head))
    groups = [
        {"name": "full", "kind": "hold", "count": 1000, "opener": opener.hex(), "spacing": 0.0005, "hold_max": 10},
        legit(200, start_at=0.3),
    ]
    rss0 = server.state()["rss_kib"]
    with Sampler(server.pid) as sampler:
        r = run_client(server.port, groups, deadline=30)
    leaks = server.leaks()
    grown = sampler.peak_rss - rss0
    # max_sniff_bytes per connection, plus the fixed cost of a connection
    # (transport, protocol, timer: a few KiB, as the slowloris row shows).
    bound = 1000 * (MAX_SNIFF_BYTES + 4096) // 1024
    full = r["full"]
    return Row(
        "Hostile: full sniff buffers",
        f"connections that each send max_sniff_bytes - 1 ({MAX_SNIFF_BYTES - 1}) bytes of a ClientHello that "
        "could still complete, then stall: the most a sniffing connection can make the server hold",
        "1,000 connections, with 200 legitimate ones",
        f"{outcomes(full)} after {full['min']:.2f}-{full['max']:.2f} s; server memory +{grown} KiB at the peak, "
        f"{grown * 1024 // 1000} bytes a connection (bound: 1,000 x (max_sniff_bytes + 4 KiB) = {bound} KiB); "
        f"{_legit_text(r['legit'])}; {leaks}",
        _closed_between(full, SNIFF_TIMEOUT * 0.9, SNIFF_TIMEOUT + CLOSE_SLACK)
        and grown <= bound
        and _legit_ok(r["legit"])
        and leaks.ok,
    )


def _oversized(server: MuxServer) -> list[Row]:
    head = b"GET / HTTP/1.1\r\nHost: www.example.com\r\nX-Pad: " + b"a" * 200_000
    # A handshake record of the largest size, declaring a 65,535-byte ClientHello.
    huge = b"\x16\x03\x01\x40\x00" + b"\x01\x00\xff\xff" + b"\x03\x03"
    groups = [
        {"name": "oversized-head", "kind": "echo", "count": 100, "opener": head.hex(), "expect": "http1"},
        {"name": "huge-hello-flood", "kind": "echo", "count": 100, "opener": (huge + bytes(100_000)).hex()},
        {"name": "huge-hello-stall", "kind": "hold", "count": 100, "opener": (huge + bytes(100)).hex()},
        legit(200),
    ]
    rss0 = server.state()["rss_kib"]
    with Sampler(server.pid) as sampler:
        r = run_client(server.port, groups, deadline=30)
    leaks = server.leaks()
    grown = sampler.peak_rss - rss0
    flood, stall = r["huge-hello-flood"], r["huge-hello-stall"]
    flood_ok = flood["outcomes"].get("ok", 0) == flood["count"] and flood["max"] < SNIFF_TIMEOUT
    stall_ok = _closed_between(stall, SNIFF_TIMEOUT * 0.9, SNIFF_TIMEOUT + CLOSE_SLACK)
    return [
        Row(
            "Hostile: oversized HTTP heads",
            "a request head that never ends (200 KB of one header) for the www.example.com Host rule: decided at "
            "max_sniff_bytes, handed to the catch-all HTTP/1 rule (never the Host rule), every byte echoed",
            "100 connections, with 200 legitimate ones",
            f"{outcomes(r['oversized-head'])}; {_legit_text(r['legit'])}; +{grown} KiB resident; {leaks}",
            all_ok(r["oversized-head"]) and _legit_ok(r["legit"]) and leaks.ok,
        ),
        Row(
            "Hostile: ClientHello with a huge declared length",
            "a TLS record of 16 KiB declaring a 65,535-byte ClientHello, followed by 100 KB of zeros (must be closed "
            "at max_sniff_bytes, before sniff_timeout) or by nothing (closed at sniff_timeout)",
            "100 + 100 connections, with 200 legitimate ones",
            f"flood: {shed(flood)} after at most {flood['max']:.2f} s; stall: "
            f"{outcomes(stall)} after {stall['min']:.2f}-{stall['max']:.2f} s; {_legit_text(r['legit'])}; {leaks}",
            flood_ok and stall_ok and _legit_ok(r["legit"]) and leaks.ok,
        ),
    ]


def _bad_host(server: MuxServer) -> Row:
    variants = {
        "host-0xff": b"www.exa\xffmple.com",
        "host-nul": b"www.example.com\x00.evil.test",
        "host-space": b"www.example.com evil.test",
        "host-ctl": b"www.\x01\x7fexample.com",
        "host-long": b"w" * 9000 + b".example.com",
        "host-empty": b"",
    }
    groups: list[dict[str, Any]] = [
        {
            "name": name,
            "kind": "echo",
            "count": 20,
            "opener": (b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n").hex(),
            "expect": "http1",
        }
        for name, host in variants.items()
    ]
    groups.append(
        {"name": "good-host", "kind": "echo", "count": 20, "opener": OPENERS["http1-www"].hex(), "expect": "http1-www"}
    )
    r = run_client(server.port, groups, deadline=30)
    leaks = server.leaks()
    bad = {n: outcomes(g) for n, g in r.items() if not all_ok(g)}
    return Row(
        "Hostile: invalid bytes in Host",
        "Host headers with 0xFF, NUL, a space, control bytes, 9 KB, or empty, against a rule for www.example.com: "
        "never given to that rule; a good Host still is",
        f"{sum(g['count'] for g in r.values())} connections ({len(variants)} kinds + control)",
        ("all as expected" if not bad else f"unexpected: {bad}") + f"; {leaks}",
        not bad and leaks.ok,
    )


def _connect_close(server: MuxServer) -> Row:
    groups = [
        {"name": "close", "kind": "echo", "count": 1000, "spacing": 0.0005},
        {"name": "reset", "kind": "abort", "count": 1000, "spacing": 0.0005},
        legit(200, start_at=0.2),
    ]
    r = run_client(server.port, groups, deadline=30)
    leaks = server.leaks()
    return Row(
        "Hostile: connect and close with no data",
        "connect then half-close without a byte (server must close its side), and connect then reset",
        "1,000 + 1,000 connections, with 200 legitimate ones",
        f"close: {shed(r['close'])}; {r['reset']['outcomes'].get('ok', 0)} reset right after connecting; "
        f"{_legit_text(r['legit'])}; {leaks}",
        all_ok(r["close"]) and all_ok(r["reset"]) and _legit_ok(r["legit"]) and leaks.ok,
    )


def hostile_clients() -> list[Row]:
    """Slowloris, oversized heads, huge ClientHello, bad Host, connect-and-close; leaks checked after each."""
    with mux_server(_ENV) as server:
        base = run_client(server.port, [legit(200)], deadline=30)["legit"]
        rows = [_slowloris(server, base["p99"]), _full_buffers(server)]
        rows += _oversized(server)
        rows.append(_bad_host(server))
        rows.append(_connect_close(server))
        code = server.stop()
    if code != 0:
        rows = [Row(r.name, r.tried, r.times, f"{r.result}; server exit {code}", False) for r in rows]
    return rows


def untrusted_proxy_headers() -> Row:
    """PROXY v1 and v2 headers from a peer outside accept_proxy_protocol are refused; trusted ones are honoured."""
    src, dst = ("203.0.113.9", 4444), ("198.51.100.1", 443)
    http = OPENERS["http1"]
    v1, v2 = build_v1(src, dst) + http, build_v2(src, dst) + http

    def group(name: str, opener: bytes, expect: str | None) -> dict[str, Any]:
        # An accepted header is consumed: the service sees only what follows it.
        spec = {"name": name, "kind": "echo", "count": 100, "opener": opener.hex(), "expect": expect}
        return {**spec, "reply": http.hex()} if expect else spec

    with mux_server({**_ENV, "MUXREL_TRUST": "192.0.2.0/24"}) as server:
        r = run_client(server.port, [group("v1", v1, None), group("v2", v2, None), group("plain", http, "http1")])
        leaks = server.leaks()
        code = server.stop()
    with mux_server({**_ENV, "MUXREL_TRUST": "127.0.0.0/8"}) as trusted:
        t = run_client(trusted.port, [group("v1", v1, "http1"), group("v2", v2, "http1")])
        trusted_code = trusted.stop()
    honoured = all(g["sources"] == {src[0]: g["count"]} for g in t.values())
    plain_source = r["plain"]["sources"] == {"127.0.0.1": 100}
    green = (
        all(all_ok(g) for g in r.values())
        and all(all_ok(g) for g in t.values())
        and honoured
        and plain_source
        and leaks.ok
        and code == trusted_code == 0
    )
    return Row(
        "Hostile: PROXY headers from untrusted peers",
        "PROXY v1 and v2 headers claiming source 203.0.113.9 from 127.0.0.1 with accept_proxy_protocol=192.0.2.0/24 "
        "(must be refused), plain clients (served, source 127.0.0.1); control: the same headers with "
        "127.0.0.0/8 trusted (source 203.0.113.9 reaches the service)",
        "200 untrusted + 100 plain + 200 trusted connections",
        f"untrusted v1: {shed(r['v1'])}, v2: {shed(r['v2'])}; plain: {outcomes(r['plain'])}, "
        f"sources {r['plain']['sources']}; trusted: v1 {outcomes(t['v1'])}, v2 {outcomes(t['v2'])}, "
        f"sources seen {[g['sources'] for g in t.values()]}; {leaks}; exit {code}, {trusted_code}",
        green,
    )
