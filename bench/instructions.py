"""
Instructions per connection: ``python -m bench.instructions [--tree DIR]... [--kind KIND]...``.

Wall-clock figures on this 2-core host move by 5-15% between runs, so a
change that saves a few microseconds of a connection cannot be told from
noise there. This measures what such a change does exactly: the user-space
instructions a server process executes per connection (``valgrind
--tool=callgrind``'s ``Ir`` count; the kernel's work is not counted, and is
the same for every tree). Each server runs twice under callgrind, serving
``--small`` and then ``--large`` sequentially started ``Connection: close``
requests (``--concurrency`` at a time, after the same warm-up), and the
figure is the difference over the difference in connections, so start-up
and shutdown cancel out. Repeated runs agree within about 1%.

Kinds: ``proxy`` (muxtwist's Proxy to nginx, as scenario 3), ``responder-sniff``
(the 6-rule sniffing responder of scenario 1), ``responder`` (the same
responder direct), ``floor`` (``bench.tcpfloor``, the bare epoll proxy).
With several ``--tree`` (say, a ``git worktree`` of the commit before a
change), every kind runs on each tree, interleaved, for an A/B that is not
timed. Results go to ``bench/results/instructions.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._procs import free_port
from bench.scenarios import nginx_config

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("proxy", "responder-sniff", "responder", "floor")
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
#: the most seconds one load may take under callgrind.
LOAD_LIMIT = 900.0


def load(port: int, count: int, concurrency: int) -> None:
    """``count`` requests, each on a new connection, ``concurrency`` at a time; every answer must be a 200."""
    selector = selectors.DefaultSelector()
    started = done = 0

    def start() -> None:
        nonlocal started
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        selector.register(sock, selectors.EVENT_WRITE, bytearray())
        started += 1

    for _ in range(min(concurrency, count)):
        start()
    deadline = time.monotonic() + LOAD_LIMIT
    while done < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done} of {count} connections answered in {LOAD_LIMIT:.0f}s")
        for key, events in selector.select(5):
            sock: Any = key.fileobj
            answer: bytearray = key.data
            if events & selectors.EVENT_WRITE:
                sock.send(REQUEST)
                selector.modify(sock, selectors.EVENT_READ, answer)
                continue
            chunk = sock.recv(65536)
            if chunk:
                answer += chunk
                continue
            if not answer.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected answer {bytes(answer[:60])!r}")
            selector.unregister(sock)
            sock.close()
            done += 1
            if started < count:
                start()
    selector.close()


def _wait_port(port: int, process: subprocess.Popen[str]) -> None:
    for _ in range(1200):
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}) before listening")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listened on {port}")


def instructions(tree: Path, kind: str, count: int, concurrency: int, workdir: Path, backend: int) -> int:
    """Instructions the server of ``kind`` from ``tree`` executed, from start to exit, serving ``count`` connections."""
    port = free_port()
    if kind == "floor":
        argv = ["-m", "bench.tcpfloor", "--port", str(port)]
    else:
        argv = ["-m", "bench.servers", kind, "--port", str(port)]
    if kind in ("proxy", "floor"):
        argv += ["--http-backend", str(backend), "--other-backend", str(backend)]
    out = workdir / f"callgrind.{os.getpid()}.{time.monotonic_ns()}"
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no", sys.executable, *argv]
    env = dict(os.environ, PYTHONPATH=str(tree))
    server = subprocess.Popen(
        command, cwd=tree, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_port(port, server)
        load(port, 200, concurrency)  # warm-up: caches, first-use imports
        load(port, count, concurrency)
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=300)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        out.unlink(missing_ok=True)
    found = re.findall(r"Collected : (\d+)", err)
    if not found:
        raise RuntimeError(f"callgrind reported no count: {err[-500:]}")
    return int(found[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", type=Path, help="a source tree to measure (default: this one)")
    parser.add_argument("--kind", action="append", choices=KINDS, help="default: all")
    parser.add_argument("--small", type=int, default=300)
    parser.add_argument("--large", type=int, default=1300)
    parser.add_argument("--concurrency", type=int, default=8)
    options = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed: apt-get install valgrind")
    trees = [t.resolve() for t in options.tree or [ROOT]]
    kinds = options.kind or list(KINDS)
    workdir = Path(tempfile.mkdtemp(prefix="muxtwist-instructions-"))
    backend = free_port()
    nginx = subprocess.Popen(
        ["nginx", "-p", str(workdir), "-c", str(nginx_config(workdir, backend)), "-e", str(workdir / "error.log")],
        start_new_session=True,
    )
    results: list[dict[str, Any]] = []
    try:
        for kind in kinds:
            for tree in trees:
                small = instructions(tree, kind, options.small, options.concurrency, workdir, backend)
                large = instructions(tree, kind, options.large, options.concurrency, workdir, backend)
                per = (large - small) / (options.large - options.small)
                results.append({"kind": kind, "tree": str(tree), "instructions_per_connection": round(per)})
                print(f"{kind:16} {per:>10,.0f}  {tree}", flush=True)
    finally:
        os.killpg(nginx.pid, signal.SIGTERM)
        nginx.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    record = {
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "small": options.small,
        "large": options.large,
        "concurrency": options.concurrency,
        "results": results,
    }
    (ROOT / "bench" / "results" / "instructions.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
