"""
``python -m bench [--quick] [--only NAME]...``: run the benchmarks and write
``bench/results/`` and ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import _procs, _results, asgi, profile, scenarios, udp
from bench._results import Scenario

ROOT = Path(__file__).resolve().parent.parent

STEPS: dict[str, Callable[[scenarios.Context], Scenario | list[Scenario]]] = {
    "inprocess": scenarios.inprocess,
    "shared": scenarios.shared,
    "proxy": scenarios.proxy,
    "scale": scenarios.scale,
    "workers": scenarios.workers_scenario,
    "tls": scenarios.tls,
    "udp": udp.udp,
    "asgi": asgi.asgi,
    "profile": profile.profile,
}


def _log(message: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short, noisy run that checks the harness")
    parser.add_argument("--only", action="append", choices=sorted(STEPS), help="run only this scenario (repeatable)")
    parser.add_argument("--runs", type=int, help="interleaved runs per measurement (default 5, quick 3)")
    parser.add_argument("--seconds", type=float, help="seconds per measurement (default 10, quick 1)")
    parser.add_argument("--idle", type=int, help="idle connections in the scale scenario (default 10000, quick 1000)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results", help="where results go")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where performance.md goes")
    parser.add_argument("--no-docs", action="store_true", help="write bench/results/ only")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the scenarios not run now from the previous results/latest.json, each labelled as earlier",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios; return a process exit status."""
    options = parse(argv)
    runs = options.runs or (3 if options.quick else 5)
    seconds = options.seconds or (1.0 if options.quick else 10.0)
    idle = options.idle or (1000 if options.quick else 10_000)
    chosen = options.only or list(STEPS)
    # Started processes (servers, the TLS client) import bench from the repository.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    _procs.raise_nofile(max(65536, idle * 3 + 1000))
    tools = _procs.ensure_tools(_log)
    missing = [tool for tool, where in tools.items() if where is None]
    from twisted.internet import reactor

    reactor_name = f"{type(reactor).__module__}.{type(reactor).__qualname__}"
    server_cpu, load_cpu = _procs.pinning()
    started = datetime.datetime.now().astimezone()
    workdir = Path(tempfile.mkdtemp(prefix="muxtwist-bench-"))
    ctx = scenarios.Context(
        workdir=workdir,
        runs=runs,
        seconds=seconds,
        idle_connections=idle,
        server_cpu=server_cpu,
        load_cpu=load_cpu,
        log=_log,
    )
    done: dict[str, Scenario] = {}
    failed: list[str] = []
    _log(f"work directory {workdir}; {runs} runs x {seconds}s; scenarios {', '.join(chosen)}")
    if missing:
        _log(f"still missing after installing: {', '.join(missing)}")
    try:
        for name in chosen:
            _log(f"scenario {name}")
            try:
                result = STEPS[name](ctx)
            except Exception:
                _log(f"scenario {name} failed:\n{traceback.format_exc()}")
                failed.append(name)
                continue
            for s in result if isinstance(result, list) else [result]:
                done[s.key] = s
    finally:
        finished = datetime.datetime.now().astimezone()
        command = "python -m bench" + (" --quick" if options.quick else "")
        command += "".join(f" --only {n}" for n in options.only or [])
        command += "".join(f" --{k} {v}" for k, v in (("runs", options.runs), ("seconds", options.seconds)) if v)
        meta = {
            "quick": options.quick,
            "runs": runs,
            "seconds": seconds,
            "idle_connections": idle,
            "started": started.isoformat(timespec="seconds"),
            "finished": finished.isoformat(timespec="seconds"),
            "scenarios_failed": failed,
            "pinning": {"servers": " ".join(server_cpu) or "none", "load": " ".join(load_cpu) or "none"},
            "machine": _procs.machine(reactor_name),
        }
        if options.merge and (options.results / "latest.json").exists():
            earlier = _results.from_json(json.loads((options.results / "latest.json").read_text()))
            kept = {key: s for key, s in earlier.items() if key not in done}
            if kept:
                meta["merged"] = [s.title for s in kept.values()]
                # The page keeps the earlier run's order of scenarios.
                order = list(earlier) + [key for key in done if key not in earlier]
                done = {key: done.get(key) or kept[key] for key in order if key in done or key in kept}
        meta["machine"]["pinning"] = (
            f"servers `{' '.join(server_cpu)}`, load `{' '.join(load_cpu)}`" if server_cpu else "none"
        )
        written = _results.write(
            options.results,
            None if options.no_docs else options.docs,
            meta,
            done,
            [*scenarios.TARGETS, *udp.TARGETS, *asgi.TARGETS],
            command,
        )
        if "raw" in ctx.profile_out:
            (options.results / "profile-raw.txt").write_text(ctx.profile_out["raw"])
        shutil.rmtree(workdir, ignore_errors=True)
        for what, path in written.items():
            _log(f"wrote {what}: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
