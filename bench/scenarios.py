"""
The five scenarios, and the profile of the sniffer. Each starts its servers,
measures every contender several times interleaved (A B C A B C ...), and
records the samples in a :class:`~bench._results.Scenario`.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import _load
from bench._procs import Server, Servers, cpu_seconds, free_port, machine_busy, python_server
from bench._results import Metric, Scenario, Target


@dataclass
class Context:
    """What every scenario needs: where to work, how long, how to pin, how to log."""

    workdir: Path
    runs: int
    seconds: float
    idle_connections: int
    server_cpu: list[str]
    load_cpu: list[str]
    log: Callable[[str], None]
    connections: int = 50
    warmup: bool = True
    profile_out: dict[str, Any] = field(default_factory=dict)


@dataclass
class Contender:
    """One way of serving: its ports, and the processes whose CPU counts as server side."""

    name: str
    http_port: int = 0
    other_port: int = 0
    measured: list[Server] = field(default_factory=list)
    http: bool = True


def _pids(contender: Contender) -> list[int]:
    return [s.pid for s in contender.measured]


def _prefix(figures: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in figures.items()}


def _wrk(
    ctx: Context,
    contender: Contender,
    *,
    close: bool,
    connections: int,
    latency: bool = False,
    pinned: bool = True,
) -> dict[str, float]:
    """One wrk run, with the server side's CPU share and CPU seconds per 10k requests."""
    pids = _pids(contender)
    before = cpu_seconds(pids) if pids else 0.0
    start = time.monotonic()
    figures = _load.wrk(
        f"http://127.0.0.1:{contender.http_port}/",
        seconds=ctx.seconds,
        connections=connections,
        close=close,
        latency=latency,
        prefix=ctx.load_cpu if pinned else [],
    )
    wall = time.monotonic() - start
    if pids:
        used = cpu_seconds(pids) - before
        figures["server_cpu"] = used / wall
        if figures.get("requests"):
            figures["cpu_10k"] = used / figures["requests"] * 10_000
    return figures


def _interleave(
    ctx: Context,
    scenario: Scenario,
    contenders: Sequence[Contender],
    measurements: Sequence[tuple[str, Callable[[Contender], dict[str, float]]]],
) -> None:
    """Run every measurement of every contender, ``ctx.runs`` times, interleaved."""
    for contender in contenders:
        scenario.add(contender.name, {})
        if contender.http and contender.http_port and ctx.warmup:
            # Discarded: the first requests of a fresh process pay for imports, caches and page faults.
            with contextlib.suppress(_load.LoadFailed):
                _load.wrk(f"http://127.0.0.1:{contender.http_port}/", seconds=1, connections=ctx.connections)
    for run in range(ctx.runs):
        for label, measure in measurements:
            for contender in contenders:
                if any(not s.alive() for s in contender.measured):
                    scenario.notes.append(f"{contender.name}: a server process died; later runs skipped")
                    continue
                ctx.log(f"  run {run + 1}/{ctx.runs} {label}: {contender.name}")
                try:
                    busy, ours, start = machine_busy(), cpu_seconds([os.getpid()]), time.monotonic()
                    figures = measure(contender)
                    wall = time.monotonic() - start
                    # CPU the whole machine spent outside this benchmark's own processes:
                    # other work on a shared machine, which makes every figure noisier.
                    figures["foreign_cpu"] = max(
                        0.0, (machine_busy() - busy - (cpu_seconds([os.getpid()]) - ours)) / wall
                    )
                    scenario.add(contender.name, _prefix(figures, label))
                except _load.LoadFailed as e:
                    scenario.notes.append(f"run {run + 1} {label} of {contender.name} failed: {str(e)[:300]}")


# Configuration files of the third-party servers


def nginx_config(workdir: Path, http_port: int, tls_port: int = 0, cert: Path | None = None) -> Path:
    """One worker, no access log, a fixed short body: a backend that is never the bottleneck."""
    tls = ""
    if tls_port and cert is not None:
        tls = f"""
    server {{
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {cert};
        location / {{ return 200 "hello, world\\n"; }}
    }}"""
    text = f"""
daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log;
worker_rlimit_nofile 65536;
events {{ worker_connections 30000; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {workdir}/nginx-body;
    proxy_temp_path {workdir}/nginx-proxy;
    fastcgi_temp_path {workdir}/nginx-fastcgi;
    uwsgi_temp_path {workdir}/nginx-uwsgi;
    scgi_temp_path {workdir}/nginx-scgi;
    server {{
        listen 127.0.0.1:{http_port} backlog=4096;
        location / {{ return 200 "hello, world\\n"; }}
    }}{tls}
}}
"""
    path = workdir / "nginx.conf"
    path.write_text(text)
    return path


def haproxy_config(workdir: Path, name: str, port: int, http: int, other: int, sni: str | None = None) -> Path:
    """HAProxy in TCP mode deciding on the request payload, as muxtwist and sslh do."""
    if sni is None:
        rules = f"""    tcp-request content accept if HTTP
    tcp-request content accept if {{ req.len gt 0 }}
    use_backend http if HTTP
    default_backend other
backend http
    server s1 127.0.0.1:{http}
backend other
    server s1 127.0.0.1:{other}"""
    else:
        rules = f"""    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend tls if {{ req.ssl_sni -i {sni} }}
backend tls
    server s1 127.0.0.1:{other}"""
    text = f"""
global
    nbthread 1
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend fe
    bind 127.0.0.1:{port}
    tcp-request inspect-delay 5s
{rules}
"""
    path = workdir / f"haproxy-{name}.cfg"
    path.write_text(text)
    return path


def start_haproxy(ctx: Context, servers: Servers, name: str, http: int, other: int, sni: str | None = None) -> Server:
    port = free_port()
    config = haproxy_config(ctx.workdir, name, port, http, other, sni)
    server = servers.start(f"haproxy-{name}", ["haproxy", "-db", "-f", str(config)], port=port, prefix=ctx.server_cpu)
    server.port = port  # type: ignore[attr-defined]
    return server


def start_sslh(ctx: Context, servers: Servers, binary: str, http: int, other: int, other_kind: str) -> Server:
    port = free_port()
    argv = [binary, "-f", "-n", "-p", f"127.0.0.1:{port}", "--http", f"127.0.0.1:{http}"]
    argv += [f"--{other_kind}", f"127.0.0.1:{other}"]
    server = servers.start(binary, argv, port=port, prefix=ctx.server_cpu)
    server.port = port  # type: ignore[attr-defined]
    return server


def start_python(ctx: Context, servers: Servers, name: str, kind: str, *extra: str) -> tuple[Server, int]:
    port = free_port()
    server = servers.start(name, python_server(kind, port, *extra), port=port, prefix=ctx.server_cpu)
    return server, port


def start_nginx(
    ctx: Context, servers: Servers, tls_cert: Path | None = None, *, pinned: bool = True
) -> tuple[Server, int, int]:
    http = free_port()
    tls = free_port() if tls_cert else 0
    config = nginx_config(ctx.workdir, http, tls, tls_cert)
    argv = ["nginx", "-p", str(ctx.workdir), "-c", str(config), "-e", str(ctx.workdir / "nginx-error.log")]
    server = servers.start("nginx", argv, port=http, prefix=ctx.load_cpu if pinned else [])
    return server, http, tls


# 1. In-process cost

INPROCESS_METRICS = [
    Metric("ka_req_s", "keep-alive", "req/s"),
    Metric("close_req_s", "new connections", "conn/s"),
    Metric("ttfb_p50_ms", "TTFB p50", "ms", higher_is_better=False),
    Metric("ttfb_p99_ms", "TTFB p99", "ms", higher_is_better=False),
    Metric("ka_server_cpu", "server CPU (keep-alive)", "share of a core", higher_is_better=False),
    Metric("ka_loadgen_cpu", "load gen CPU (keep-alive)", "share of a core", higher_is_better=False),
    Metric("close_loadgen_cpu", "load gen CPU (new conns)", "share of a core", higher_is_better=False),
    Metric("ka_foreign_cpu", "other processes' CPU (keep-alive)", "cores", higher_is_better=False),
]


#: How muxtwist's contenders log, in every scenario that runs them as ``bench.servers``.
LOG_NOTE = (
    "muxtwist runs with `log_connections=False` (no line per connection), as nginx runs with `access_log "
    "off` and HAProxy and sslh with no connection log; scenario 1 measures the line's cost."
)

#: Scenario 1's contender that logs every connection's end to a file, as muxtwist does by default.
LOGGED = "muxtwist SniffingFactory, connection log to a file"


def inprocess(ctx: Context) -> Scenario:
    """A minimal keep-alive responder, direct and behind a 6-rule SniffingFactory (HTTP1 6th)."""
    scenario = Scenario(
        "inprocess",
        "1. In-process cost of sniffing",
        "direct",
        INPROCESS_METRICS,
        notes=[
            "Server: a raw Twisted Protocol answering fixed HTTP/1.1 responses; the sniffing contender puts it "
            "behind SniffingFactory([TLS, SSH, Redis, PostgreSQL, MQTT, HTTP1]), so the winning rule is the "
            "6th of 6.",
            f"wrk -t1 -c{ctx.connections}, keep-alive and with `Connection: close`; TTFB is wrk --latency with "
            "one connection at a time and `Connection: close`, so every request pays a new connection and "
            "its sniffing (time from writing the request to the complete, one-packet response).",
            f"`{LOGGED}`: the same factory with muxtwist's default `log_connections=True`, the process "
            "logging to a file as `twistd -l FILE muxtwist` does (one `connection_end` line per connection): "
            "what the line costs. " + LOG_NOTE,
        ],
    )
    with Servers(ctx.workdir) as servers:
        direct, direct_port = start_python(ctx, servers, "responder", "responder")
        sniff, sniff_port = start_python(ctx, servers, "responder-sniff", "responder-sniff")
        log = str(ctx.workdir / "responder-sniff-log.log")
        logged, logged_port = start_python(ctx, servers, "responder-sniff-log", "responder-sniff", "--log-file", log)
        contenders = [
            Contender("direct", direct_port, measured=[direct]),
            Contender("muxtwist SniffingFactory (6th of 6)", sniff_port, measured=[sniff]),
            Contender(LOGGED, logged_port, measured=[logged]),
        ]
        _interleave(
            ctx,
            scenario,
            contenders,
            [
                ("ka", lambda c: _wrk(ctx, c, close=False, connections=ctx.connections)),
                ("close", lambda c: _wrk(ctx, c, close=True, connections=ctx.connections)),
                ("ttfb", lambda c: _wrk(ctx, c, close=True, connections=1, latency=True)),
            ],
        )
    return scenario


# 2. A Site sharing a port

SHARED_METRICS = [
    Metric("ka_req_s", "keep-alive", "req/s"),
    Metric("ka_cpu_10k", "CPU per 10k req (keep-alive)", "CPU s", higher_is_better=False),
    Metric("close_req_s", "new connections", "conn/s"),
    Metric("close_cpu_10k", "CPU per 10k req (new conns)", "CPU s", higher_is_better=False),
    Metric("ka_loadgen_cpu", "load gen CPU (keep-alive)", "share of a core", higher_is_better=False),
    Metric("ka_foreign_cpu", "other processes' CPU (keep-alive)", "cores", higher_is_better=False),
]


def shared(ctx: Context) -> Scenario:
    """A twisted.web Site sharing its port with an echo service: in-process vs HAProxy vs sslh in front."""
    scenario = Scenario(
        "shared",
        "2. A twisted.web Site sharing a port with another protocol",
        "Site alone",
        SHARED_METRICS,
        notes=[
            "The other protocol is SSH (to an echo service for muxtwist; to a sink for HAProxy and sslh); only "
            "HTTP is loaded. CPU seconds count every server-side process: muxtwist's one process, or the proxy "
            "plus the Site's process. `Site alone` is the Site on its own port, sharing nothing.",
            LOG_NOTE,
        ],
    )
    with Servers(ctx.workdir) as servers:
        site, site_port = start_python(ctx, servers, "site", "site")
        mux, mux_port = start_python(ctx, servers, "site-mux", "site-mux")
        sink, sink_port = start_python(ctx, servers, "sink", "sink")
        haproxy = start_haproxy(ctx, servers, "shared", site_port, sink_port)
        sslh = start_sslh(ctx, servers, "sslh-select", site_port, sink_port, "ssh")
        contenders = [
            Contender("Site alone", site_port, measured=[site]),
            Contender("muxtwist (in-process)", mux_port, measured=[mux]),
            Contender("HAProxy → Site", haproxy.port, measured=[haproxy, site]),  # type: ignore[attr-defined]
            Contender("sslh-select → Site", sslh.port, measured=[sslh, site]),  # type: ignore[attr-defined]
        ]
        _interleave(
            ctx,
            scenario,
            contenders,
            [
                ("ka", lambda c: _wrk(ctx, c, close=False, connections=ctx.connections)),
                ("close", lambda c: _wrk(ctx, c, close=True, connections=ctx.connections)),
            ],
        )
    return scenario


# 3. Proxy relay

PROXY_METRICS = [
    Metric("ka_req_s", "keep-alive", "req/s"),
    Metric("close_req_s", "new connections", "conn/s"),
    Metric("bulk_mb_s", "bulk (iperf3)", "MB/s"),
    Metric("ka_cpu_10k", "proxy CPU per 10k req (keep-alive)", "CPU s", higher_is_better=False),
    Metric("ka_loadgen_cpu", "load gen CPU (keep-alive)", "share of a core", higher_is_better=False),
    Metric("bulk_loadgen_cpu", "iperf3 client CPU", "share of a core", higher_is_better=False),
    Metric("ka_foreign_cpu", "other processes' CPU (keep-alive)", "cores", higher_is_better=False),
]


def _iperf(ctx: Context, contender: Contender) -> dict[str, float]:
    return _load.iperf3(contender.other_port, seconds=ctx.seconds, prefix=ctx.load_cpu)


def proxy(ctx: Context) -> Scenario:
    """Relaying to nginx and iperf3: muxtwist Proxy vs HAProxy vs sslh vs twistd portforward vs direct."""
    scenario = Scenario(
        "proxy",
        "3. Proxy relay to nginx and iperf3",
        "direct",
        PROXY_METRICS,
        notes=[
            "Each proxy listens on one port and decides on the first bytes: HTTP to nginx (one worker, "
            "`return 200`), anything else to `iperf3 -s`; `twistd portforward` cannot decide, so it runs "
            "twice, one per backend. Proxies are pinned to CPU 0; wrk, iperf3 and nginx to CPU 1.",
            "Python floor: `python -m bench.tcpfloor`, the same deciding and relaying in one bare `epoll` "
            "loop (first bytes pick the backend, non-blocking connect, recv/send both ways, half-close "
            "passed on) with no framework, timeouts, limits, logging, failover or splice: what CPython on "
            "this machine can do with the system calls of a proxied connection.",
            LOG_NOTE,
        ],
    )
    try:
        from muxtwist.actions import Proxy  # noqa: F401
    except ImportError as e:
        scenario.skip("muxtwist Proxy", f"muxtwist.actions.Proxy does not import: {e}")
        have_proxy = False
    else:
        have_proxy = True
    with Servers(ctx.workdir) as servers:
        nginx, nginx_port, _ = start_nginx(ctx, servers)
        iperf_port = free_port()
        servers.start(
            "iperf3-server", ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port)], prefix=ctx.load_cpu
        ).wait_port(iperf_port)
        contenders = [Contender("direct", nginx_port, iperf_port)]
        if have_proxy:
            mux, mux_port = start_python(
                ctx,
                servers,
                "muxtwist-proxy",
                "proxy",
                "--http-backend",
                str(nginx_port),
                "--other-backend",
                str(iperf_port),
            )
            contenders.append(Contender("muxtwist Proxy", mux_port, mux_port, [mux]))
        floor_port = free_port()
        argv = [sys.executable, "-m", "bench.tcpfloor", "--port", str(floor_port)]
        argv += ["--http-backend", str(nginx_port), "--other-backend", str(iperf_port)]
        floor = servers.start("python-floor", argv, port=floor_port, prefix=ctx.server_cpu)
        contenders.append(Contender("Python floor", floor_port, floor_port, [floor]))
        haproxy = start_haproxy(ctx, servers, "proxy", nginx_port, iperf_port)
        contenders.append(Contender("HAProxy", haproxy.port, haproxy.port, [haproxy]))  # type: ignore[attr-defined]
        for binary in ("sslh-select", "sslh"):
            sslh = start_sslh(ctx, servers, binary, nginx_port, iperf_port, "anyprot")
            label = "sslh-fork" if binary == "sslh" else binary
            # sslh-fork's children are reaped by the kernel (SIGCHLD ignored), so their CPU time
            # is lost to /proc accounting: no CPU figure for it rather than a wrong one.
            measured = [] if binary == "sslh" else [sslh]
            contenders.append(Contender(label, sslh.port, sslh.port, measured))  # type: ignore[attr-defined]
        forwards = []
        for backend in (nginx_port, iperf_port):
            port = free_port()
            argv = ["twistd", "-n", "--pidfile=", "-l", str(ctx.workdir / f"portforward-{port}.log"), "portforward"]
            argv += ["-p", f"tcp:{port}:interface=127.0.0.1", "-h", "127.0.0.1", "-d", str(backend)]
            forwards.append((servers.start(f"portforward-{port}", argv, port=port, prefix=ctx.server_cpu), port))
        contenders.append(Contender("twistd portforward", forwards[0][1], forwards[1][1], [f for f, _ in forwards]))
        del nginx
        _interleave(
            ctx,
            scenario,
            contenders,
            [
                ("ka", lambda c: _wrk(ctx, c, close=False, connections=ctx.connections)),
                ("close", lambda c: _wrk(ctx, c, close=True, connections=ctx.connections)),
                ("bulk", lambda c: _iperf(ctx, c)),
            ],
        )
    scenario.notes.append(_splice_note())
    return scenario


def _splice_note() -> str:
    try:
        from muxtwist.proxy import _splice
    except ImportError:
        available = False
    else:
        available = _splice.AVAILABLE
    if available:
        return (
            "muxtwist's Proxy relays with its Linux path here: once the sniffed bytes are sent, it reads and "
            "writes both sockets itself (recv/send for small exchanges; splice(2) through a pipe from a "
            "direction's first full 64 KiB read, so bulk bytes are never copied into Python)."
        )
    return (
        "muxtwist's Proxy used the portable Twisted relay here (no os.splice on this platform): every byte is "
        "read into Python and written back."
    )


def workers(ctx: Context) -> tuple[bool, str]:
    """Whether ``twistd muxtwist --workers`` exists."""
    try:
        from muxtwist.tap import Options
    except ImportError as e:
        return False, f"muxtwist.tap does not import: {e}"
    options = Options()
    known = {p[0] for p in getattr(options, "optParameters", [])} | {f[0] for f in getattr(options, "optFlags", [])}
    if "workers" in known or hasattr(options, "opt_workers"):
        return True, ""
    return False, "`twistd muxtwist --workers` is not built yet"


WORKERS_METRICS = [
    Metric("ka_req_s", "keep-alive", "req/s"),
    Metric("close_req_s", "new connections", "conn/s"),
    Metric("ka_cpu_10k", "CPU per 10k req (keep-alive)", "CPU s", higher_is_better=False),
    Metric("ka_loadgen_cpu", "load gen CPU (keep-alive)", "share of a core", higher_is_better=False),
    Metric("ka_foreign_cpu", "other processes' CPU (keep-alive)", "cores", higher_is_better=False),
]

RULES = """
from muxtwist import Rule
from muxtwist.actions import Proxy
from muxtwist.matchers import HTTP1, Any

rules = [
    Rule(HTTP1(), Proxy("tcp:host=127.0.0.1:port={http}")),
    Rule(Any(), Proxy("tcp:host=127.0.0.1:port={other}")),
]
"""


def workers_scenario(ctx: Context) -> Scenario:
    """Scenario 3's muxtwist Proxy under ``twistd muxtwist``, with one worker process and with two."""
    scenario = Scenario(
        "workers",
        "4b. twistd muxtwist --workers 2 vs 1 (proxy relay to nginx)",
        "--workers 1",
        WORKERS_METRICS,
        notes=[
            "`twistd -n muxtwist --config rules.py` with scenario 3's rules (HTTP to nginx). Nothing is pinned "
            "here, so that two workers can use both cores; wrk and nginx share those same two cores, so the "
            "gain is bounded by the machine, not by muxtwist alone.",
        ],
    )
    ok, why = workers(ctx)
    if not ok:
        scenario.skip("--workers 2 vs 1", why)
        return scenario
    with Servers(ctx.workdir) as servers:
        _, nginx_port, _ = start_nginx(ctx, servers, pinned=False)
        config = ctx.workdir / "rules_workers.py"
        config.write_text(RULES.format(http=nginx_port, other=nginx_port))
        contenders = []
        for count in (1, 2):
            port = free_port()
            argv = ["twistd", "-n", "--pidfile=", "-l", "-", "muxtwist", "--port", f"tcp:{port}:interface=127.0.0.1"]
            argv += ["--config", str(config), "--workers", str(count)]
            server = servers.start(f"twistd-muxtwist-workers-{count}", argv, port=port)
            contenders.append(Contender(f"--workers {count}", port, measured=[server]))
        _interleave(
            ctx,
            scenario,
            contenders,
            [
                ("ka", lambda c: _wrk(ctx, c, close=False, connections=ctx.connections, pinned=False)),
                ("close", lambda c: _wrk(ctx, c, close=True, connections=ctx.connections, pinned=False)),
            ],
        )
    return scenario


# 4. Scale


SCALE_METRICS = [
    Metric("heap_per_conn", "Python heap per connection", "bytes", higher_is_better=False),
    Metric("rss_per_conn", "RSS per connection", "bytes", higher_is_better=False),
    Metric("rss_base_mb", "RSS baseline", "MB", higher_is_better=False),
]


class _ControlClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rwb")

    def ask(self, command: str) -> Any:
        self.file.write(command.encode() + b"\n")
        self.file.flush()
        return json.loads(self.file.readline())

    def close(self) -> None:
        self.file.close()
        self.sock.close()


#: idle connections opened at a time: the next batch waits until the server has taken these.
#: Opened all at once (about 2 s here), they queue in a traced server for several seconds,
#: longer than Proxy's connect_timeout (5 s) on a shared core, and the relays whose backend
#: connect waited that long give up and close their client.
IDLE_BATCH = 500


def _open_idle(
    port: int, count: int, payload: bytes, deadline: float, settled: Callable[[int], object] | None
) -> list[socket.socket]:
    """Open ``count`` connections, calling ``settled(opened)`` (if given) after each batch of ``IDLE_BATCH``."""
    sockets = []
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if payload:
            s.sendall(payload)
        sockets.append(s)
        if settled is not None and len(sockets) % IDLE_BATCH == 0:
            settled(len(sockets))
    return sockets


def _wait_count(control: _ControlClient, key: str, want: int, deadline: float) -> int:
    """Poll the server's cheap ``count`` (no collection) until ``key`` reaches ``want`` or the deadline."""
    counts: dict[str, Any] = control.ask("count")
    while counts.get(key, 0) < want and time.monotonic() < deadline:
        time.sleep(0.1)
        counts = control.ask("count")
    return int(counts.get(key, 0))


def _scale_once(
    ctx: Context, kind: str, traced: bool, sink_port: int, count: int
) -> tuple[dict[str, float], list[str]]:
    """One server, ``count`` idle connections: per-connection growth above the baseline."""
    with Servers(ctx.workdir) as servers:
        control_port = free_port()
        extra = ["--control", str(control_port)]
        if traced:
            extra.append("--tracemalloc")
        if kind == "scale-proxy":
            extra += ["--other-backend", str(sink_port)]
        server, port = start_python(ctx, servers, f"{kind}{'-traced' if traced else ''}", kind, *extra)
        server.wait_port(control_port)
        control = _ControlClient(control_port)
        sockets: list[socket.socket] = []
        try:
            time.sleep(0.2)
            base = control.ask("stats")
            if traced:
                control.ask("mark")
            deadline = time.monotonic() + 120
            payload = b"hello\n" if kind == "scale-proxy" else b""
            key = "linked" if kind == "scale-proxy" else "connections"
            # The control connection is not counted: it is on its own port.
            # Only the traced run, which needs it, is paced: opened at once, many relays wait at the
            # same time, and the untraced run's RSS keeps the memory that burst took (about 700 B
            # more per proxied connection here); its figures stay comparable with earlier runs.
            settled = (lambda n: _wait_count(control, key, n, deadline)) if traced else None
            sockets = _open_idle(port, count, payload, deadline, settled)
            _wait_count(control, key, len(sockets), deadline)
            time.sleep(0.3)
            stats = control.ask("stats")
            top = control.ask("top") if traced else []
            n = stats.get(key, 0)
            if n < count:
                raise _load.LoadFailed(f"only {n} of {count} idle connections were established ({len(sockets)} opened)")
            figures: dict[str, float] = {"rss_per_conn": (stats["rss"] - base["rss"]) / n}
            if traced:
                figures = {"heap_per_conn": (stats["heap"] - base["heap"]) / n}
            else:
                figures["rss_base_mb"] = base["rss"] / 1e6
            return figures, top
        finally:
            for s in sockets:
                with contextlib.suppress(OSError):
                    s.close()
            control.close()


def scale(ctx: Context) -> Scenario:
    """Memory with many idle connections, sniffing and proxied."""
    count = ctx.idle_connections
    scenario = Scenario(
        "scale",
        f"4. Memory with {count:,} idle connections",
        None,
        SCALE_METRICS,
        notes=[
            "Per connection = (figure with the connections open - figure before them) / connections, in the "
            "server process. RSS comes from /proc in a run without tracemalloc; the Python heap from "
            "tracemalloc in a separate run with it on. Sniffing connections sent no byte yet (behind the "
            "6-rule SniffingFactory); proxied ones sent `hello` and are relayed by muxtwist's Proxy to a "
            "process that holds them.",
        ],
    )
    # A proxied connection holds two descriptors in the server; the hard limit may not be raisable.
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    proxied = min(count, (limit - 300) // 2)
    if proxied < count:
        scenario.notes.append(
            f"Proxied: {proxied:,} connections, not {count:,}: the open-file limit here is {limit:,} and "
            "cannot be raised, and each relay holds two descriptors."
        )
    with Servers(ctx.workdir) as servers:
        sink, sink_port = start_python(ctx, servers, "scale-sink", "sink")
        contenders = [("sniffing (idle)", "scale-sniff", count), ("proxied (idle)", "scale-proxy", proxied)]
        for name, _, _ in contenders:
            scenario.add(name, {})
        for run in range(ctx.runs):
            for name, kind, n in contenders:
                for traced in (False, True):
                    ctx.log(f"  run {run + 1}/{ctx.runs} {name} {'tracemalloc' if traced else 'rss'}")
                    try:
                        figures, top = _scale_once(ctx, kind, traced, sink_port, n)
                    except (_load.LoadFailed, OSError) as e:
                        scenario.notes.append(f"run {run + 1} of {name} failed: {str(e)[:300]}")
                        continue
                    scenario.add(name, figures)
                    if top and run == 0:
                        scenario.extra[f"tracemalloc top ({name})"] = top
        del sink
    return scenario


# 5. TLS


TLS_METRICS = [
    Metric("hs_handshakes_s", "handshakes", "handshakes/s"),
    Metric("hs_loadgen_cpu", "load gen CPU", "share of a core", higher_is_better=False),
]


def make_certificate(workdir: Path, name: str = "bench.test") -> Path:
    """A self-signed P-256 certificate and its key in one PEM file."""
    key, cert, both = workdir / "key.pem", workdir / "cert.pem", workdir / "both.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName=DNS:{name}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    return both


def _handshakes(ctx: Context, contender: Contender) -> dict[str, float]:
    return _load.tls_handshakes(contender.http_port, seconds=ctx.seconds, sni="bench.test", prefix=ctx.load_cpu)


def tls(ctx: Context) -> list[Scenario]:
    """TerminateTLS vs a plain Twisted TLS endpoint; SNI passthrough, muxtwist vs HAProxy."""
    terminate = Scenario(
        "tls",
        "5a. TLS termination: handshakes per second",
        "Twisted ssl: endpoint",
        TLS_METRICS,
        notes=[
            "Each handshake is a full one (no resumption, TLS 1.3, P-256 certificate) followed by one small "
            "HTTP request to the same twisted.web Site; the client is a Python ssl loop with 2 threads in its "
            "own process (bench/tlsclient.py) on CPU 1.",
            LOG_NOTE,
        ],
    )
    sni = Scenario(
        "sni",
        "5b. SNI passthrough to nginx: handshakes per second",
        "nginx direct",
        TLS_METRICS,
        notes=["The proxies read the ClientHello's server name and relay the encrypted stream to nginx.", LOG_NOTE],
    )
    cert = make_certificate(ctx.workdir)
    have_tls = have_proxy = True
    try:
        from muxtwist.actions import TerminateTLS  # noqa: F401
    except ImportError as e:
        terminate.skip("TerminateTLS", f"feature not built yet ({e})")
        have_tls = False
    try:
        from muxtwist.actions import Proxy  # noqa: F401
        from muxtwist.matchers import TLS  # noqa: F401
    except ImportError as e:
        sni.skip("muxtwist SNI passthrough", f"feature not built yet ({e})")
        have_proxy = False
    with Servers(ctx.workdir) as servers:
        plain, plain_port = start_python(ctx, servers, "tls-plain", "tls-plain", "--cert", str(cert))
        contenders = [Contender("Twisted ssl: endpoint", plain_port, measured=[plain], http=False)]
        if have_tls:
            mux, mux_port = start_python(ctx, servers, "tls-terminate", "tls-terminate", "--cert", str(cert))
            contenders.append(Contender("muxtwist TerminateTLS", mux_port, measured=[mux], http=False))
        _interleave(ctx, terminate, contenders, [("hs", lambda c: _handshakes(ctx, c))])
    with Servers(ctx.workdir) as servers:
        nginx, _, nginx_tls = start_nginx(ctx, servers, tls_cert=cert)
        contenders = [Contender("nginx direct", nginx_tls, http=False)]
        if have_proxy:
            mux, mux_port = start_python(ctx, servers, "sni-proxy", "sni-proxy", "--other-backend", str(nginx_tls))
            contenders.append(Contender("muxtwist TLS(sni) + Proxy", mux_port, measured=[mux], http=False))
        haproxy = start_haproxy(ctx, servers, "sni", 0, nginx_tls, sni="bench.test")
        contenders.append(Contender("HAProxy req.ssl_sni", haproxy.port, measured=[haproxy], http=False))  # type: ignore[attr-defined]
        del nginx
        _interleave(ctx, sni, contenders, [("hs", lambda c: _handshakes(ctx, c))])
    return [terminate, sni]


TARGETS = [
    Target("inprocess", "ka_req_s", "muxtwist SniffingFactory (6th of 6)", "direct", ">=", 0.98,
           "1. keep-alive req/s ≥ 0.98x direct"),
    Target("inprocess", "close_req_s", "muxtwist SniffingFactory (6th of 6)", "direct", ">=", 0.90,
           "1. new connections/s ≥ 0.90x direct"),
    Target("inprocess", "ttfb_p50_ms", "muxtwist SniffingFactory (6th of 6)", "direct", "<=", 1.10,
           "1. TTFB p50 within 10% of direct"),
    Target("inprocess", "ttfb_p99_ms", "muxtwist SniffingFactory (6th of 6)", "direct", "<=", 1.10,
           "1. TTFB p99 within 10% of direct"),
    Target("shared", "ka_req_s", "muxtwist (in-process)", "HAProxy → Site", ">=", 1.0,
           "2. req/s (keep-alive) above HAProxy → Site"),
    Target("shared", "ka_req_s", "muxtwist (in-process)", "sslh-select → Site", ">=", 1.0,
           "2. req/s (keep-alive) above sslh-select → Site"),
    Target("shared", "ka_cpu_10k", "muxtwist (in-process)", "HAProxy → Site", "<=", 1.0,
           "2. CPU per 10k req (keep-alive) below HAProxy → Site"),
    Target("shared", "ka_cpu_10k", "muxtwist (in-process)", "sslh-select → Site", "<=", 1.0,
           "2. CPU per 10k req (keep-alive) below sslh-select → Site"),
    Target("shared", "close_req_s", "muxtwist (in-process)", "HAProxy → Site", ">=", 1.0,
           "2. new connections/s above HAProxy → Site"),
    Target("shared", "close_req_s", "muxtwist (in-process)", "sslh-select → Site", ">=", 1.0,
           "2. new connections/s above sslh-select → Site"),
    Target("shared", "close_cpu_10k", "muxtwist (in-process)", "HAProxy → Site", "<=", 1.0,
           "2. CPU per 10k new connections below HAProxy → Site"),
    Target("shared", "close_cpu_10k", "muxtwist (in-process)", "sslh-select → Site", "<=", 1.0,
           "2. CPU per 10k new connections below sslh-select → Site"),
    Target("proxy", "ka_req_s", "muxtwist Proxy", "twistd portforward", ">=", 1.5,
           "3. keep-alive req/s ≥ 1.5x twistd portforward"),
    Target("proxy", "close_req_s", "muxtwist Proxy", "twistd portforward", ">=", 1.5,
           "3. new connections/s ≥ 1.5x twistd portforward"),
    Target("proxy", "bulk_mb_s", "muxtwist Proxy", "twistd portforward", ">=", 1.5,
           "3. bulk MB/s ≥ 1.5x twistd portforward"),
    Target("proxy", "bulk_mb_s", "muxtwist Proxy", "HAProxy", ">=", 1.0,
           "3. bulk MB/s ≥ HAProxy"),
    Target("proxy", "close_req_s", "muxtwist Proxy", "HAProxy", ">=", 0.6,
           "3. new connections/s ≥ 0.6x HAProxy"),
    Target("proxy", "ka_req_s", "muxtwist Proxy", "HAProxy", ">=", 0.95,
           "3. keep-alive req/s ≥ 0.95x HAProxy"),
    Target("proxy", "ka_cpu_10k", "muxtwist Proxy", "HAProxy", "<=", 1.1,
           "3. proxy CPU per 10k keep-alive req ≤ 1.1x HAProxy"),
    Target("scale", "heap_per_conn", "sniffing (idle)", None, "<=", 4096,
           "4. Python heap per idle sniffing connection ≤ 4 KiB (bytes)"),
    Target("scale", "heap_per_conn", "proxied (idle)", None, "<=", 4096,
           "4. Python heap per idle proxied connection ≤ 4 KiB (bytes)"),
    Target("tls", "hs_handshakes_s", "muxtwist TerminateTLS", "Twisted ssl: endpoint", ">=", 0.95,
           "5. TerminateTLS handshakes/s ≥ 0.95x plain Twisted TLS"),
]  # fmt: skip
