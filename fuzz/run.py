"""
Run every atheris harness of this directory for a bounded time.

    python fuzz/run.py [--seconds 20] [--no-captures] [NAME ...]

Each harness starts from a seed corpus of real openers (the bytes real
clients send, taken by tests/captures.py, unless ``--no-captures``; built
openers; ordinary text) and runs for ``--seconds`` (``FUZZ_SECONDS`` in the
environment, 20 by default). Crash
inputs are copied to ``fuzz/crashes/<name>-<sha1>``; the exit status is 1 if
there is any, so CI fails and the input can become a regression test in
``tests/test_fuzz_regressions.py``.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from targets import SEEDS, TARGETS  # noqa: E402
from udp_targets import UDP_TARGETS, udp_seeds  # noqa: E402

TARGETS = {**TARGETS, **UDP_TARGETS}


def fuzz(name: str, seconds: int, crashes: str, seeds: list[bytes]) -> tuple[bool, str]:
    """Run harness ``name``; return whether it stayed clean, and its last status line."""
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as work:
        corpus = os.path.join(work, "corpus")
        os.mkdir(corpus)
        for i, seed in enumerate(seeds):
            with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
                f.write(seed)
        log_path = os.path.join(work, "log")
        with open(log_path, "wb") as log:
            proc = subprocess.run(
                [
                    sys.executable,
                    os.path.join(HERE, f"fuzz_{name}.py"),
                    f"-max_total_time={seconds}",
                    "-rss_limit_mb=2048",
                    "-timeout=10",
                    f"-artifact_prefix={work}/",
                    corpus,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=seconds + 120,
                check=False,
            )
        with open(log_path, errors="replace") as f:
            lines = f.read().splitlines()
        found = glob.glob(os.path.join(work, "crash-*")) + glob.glob(os.path.join(work, "oom-*"))
        stalls = []
        for path in glob.glob(os.path.join(work, "timeout-*")):
            if _reproduces(name, path):
                found.append(path)
            else:
                stalls.append(os.path.basename(path))
        for path in found:
            os.makedirs(crashes, exist_ok=True)
            shutil.copy(path, os.path.join(crashes, f"{name}-{os.path.basename(path)}"))
        done = [ln for ln in lines if ln.startswith("Done ")]
        if found or (proc.returncode != 0 and not stalls):
            tail = "\n".join(lines[-40:])
            return False, f"exit {proc.returncode}, {len(found)} crash input(s) in {crashes}\n{tail}"
        status = done[-1] if done else "stopped early"
        if stalls:
            status += f"; a timeout that does not reproduce (the machine stalled), ignored: {', '.join(stalls)}"
        return True, status


def _reproduces(name: str, path: str) -> bool:
    """Whether a timeout input is slow again: run it three times with the same per-input limit."""
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, f"fuzz_{name}.py"), "-timeout=10", "-runs=3", path],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )
    return proc.returncode != 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", "20")))
    parser.add_argument("--no-captures", action="store_true", help="seed without running the real clients")
    parser.add_argument("names", nargs="*", default=list(TARGETS), help="harnesses (default: all)")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(TARGETS))
    if unknown:
        parser.error(f"unknown harness {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    if args.seconds <= 0:
        parser.error(f"--seconds must be positive, got {args.seconds}")
    seeds = SEEDS(real_captures=not args.no_captures)
    seeds.update(udp_seeds())
    crashes = os.path.join(HERE, "crashes")
    clean = True
    for name in args.names:
        started = time.monotonic()
        ok, status = fuzz(name, args.seconds, crashes, seeds.get(name, []))
        clean = clean and ok
        print(f"{'ok   ' if ok else 'CRASH'} {name:15} {time.monotonic() - started:5.1f}s  {status}", flush=True)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
