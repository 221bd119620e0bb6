"""
ASGI scenario: the same ASGI application served by uvicorn alone on its own
port, by muxtwist in-process (``muxtwist.apps.ASGI`` behind a sniffer that
also routes SSH), and by uvicorn behind HAProxy and sslh sharing a port with
SSH. ``python -m bench.asgi mux PORT SINK_PORT`` is the muxtwist server.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from typing import Any

from bench._procs import Servers, free_port
from bench._results import Metric, Scenario, Target
from bench.scenarios import Contender, Context, _interleave, _wrk, start_haproxy, start_python, start_sslh

BODY = b"hello from ASGI\n"


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The benchmarked application: a fixed plain-text response."""
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


async def _serve_mux(port: int, sink: int) -> None:
    import muxtwist.aio

    # Proxy(...) binds the reactor it is built with: install the asyncio one
    # on this loop before any rule is built, or Proxy installs the default one.
    muxtwist.aio.install_reactor()
    from muxtwist import Rule
    from muxtwist.actions import Proxy
    from muxtwist.apps import ASGI
    from muxtwist.matchers import HTTP1, SSH

    rules = [Rule(SSH(), Proxy(f"tcp:host=127.0.0.1:port={sink}")), Rule(HTTP1(), ASGI(app))]
    await muxtwist.aio.serve(rules, f"tcp:{port}:interface=127.0.0.1", log_connections=False)
    await asyncio.Event().wait()


#: muxtwist in-process beats both proxies in front of uvicorn (issue 19).
TARGETS = [
    Target("asgi", metric, "muxtwist ASGI (in-process)", proxy, ">=", 1.0, f"7. {what} above {proxy}")
    for metric, what in (("ka_req_s", "ASGI keep-alive req/s"), ("close_req_s", "ASGI new connections/s"))
    for proxy in ("HAProxy → uvicorn", "sslh-select → uvicorn")
]

METRICS = [
    Metric("ka_req_s", "keep-alive", "req/s"),
    Metric("ka_cpu_10k", "CPU per 10k req (keep-alive)", "CPU s", higher_is_better=False),
    Metric("close_req_s", "new connections", "conn/s"),
    Metric("close_cpu_10k", "CPU per 10k req (new conns)", "CPU s", higher_is_better=False),
    Metric("ka_foreign_cpu", "other processes' CPU (keep-alive)", "cores", higher_is_better=False),
]


def asgi(ctx: Context) -> Scenario:
    """One ASGI app: uvicorn alone, muxtwist in-process, HAProxy and sslh in front of uvicorn."""

    scenario = Scenario(
        "asgi",
        "7. An ASGI application sharing a port with SSH",
        "uvicorn alone",
        METRICS,
        notes=[
            "The application is a bare ASGI callable answering a fixed response; uvicorn and muxtwist both use "
            "uvicorn's HTTP/1.1 protocol class (h11 or httptools, whichever is installed). muxtwist runs it "
            "in-process on the asyncio reactor behind SniffingFactory([SSH, HTTP1]); HAProxy and sslh put "
            "uvicorn behind a port shared with SSH (to a sink). CPU counts every server-side process.",
        ],
    )
    with Servers(ctx.workdir) as servers:
        uvicorn_port = free_port()
        uvicorn = servers.start(
            "uvicorn",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bench.asgi:app",
                "--port",
                str(uvicorn_port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            port=uvicorn_port,
            prefix=ctx.server_cpu,
        )
        sink, sink_port = start_python(ctx, servers, "sink", "sink")
        mux_port = free_port()
        mux = servers.start(
            "asgi-mux",
            [sys.executable, "-m", "bench.asgi", "mux", str(mux_port), str(sink_port)],
            port=mux_port,
            prefix=ctx.server_cpu,
        )
        haproxy = start_haproxy(ctx, servers, "asgi", uvicorn_port, sink_port)
        contenders = [
            Contender("uvicorn alone", uvicorn_port, measured=[uvicorn]),
            Contender("muxtwist ASGI (in-process)", mux_port, measured=[mux]),
            Contender("HAProxy → uvicorn", haproxy.port, measured=[haproxy, uvicorn]),  # type: ignore[attr-defined]
        ]
        if shutil.which("sslh-select"):
            sslh = start_sslh(ctx, servers, "sslh-select", uvicorn_port, sink_port, "ssh")
            contenders.append(Contender("sslh-select → uvicorn", sslh.port, measured=[sslh, uvicorn]))  # type: ignore[attr-defined]
        else:
            scenario.notes.append("sslh-select is not installed: no sslh contender in this run")
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


if __name__ == "__main__":
    if sys.argv[1:2] == ["mux"]:
        asyncio.run(_serve_mux(int(sys.argv[2]), int(sys.argv[3])))
    else:
        sys.exit("usage: python -m bench.asgi mux PORT SINK_PORT")
