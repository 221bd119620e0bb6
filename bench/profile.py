"""
Where the sniffer spends its time: ``py-spy record`` on the sniffing
responder while wrk opens new connections, folded into the muxtwist
functions that take the most samples.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

from bench import _load
from bench._procs import Servers, ensure_py_spy
from bench._results import Metric, Scenario
from bench.scenarios import Context, start_python

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?):(?P<line>\d+)\)$")


def _short(path: str) -> str:
    """A file path from its package on: ``muxtwist/sniffing.py``, ``twisted/internet/tcp.py``."""
    for root in ("muxtwist/", "twisted/", "bench/"):
        at = path.rfind(root)
        if at >= 0:
            return path[at:]
    return path.rsplit("/", 1)[-1]


def fold(raw: str, focus: str = "muxtwist/") -> tuple[int, Counter[str], Counter[str]]:
    """
    From py-spy's raw (collapsed) stacks: total samples, and per function in
    files whose path contains ``focus``, the inclusive and the self samples.
    """
    total = 0
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        seen: set[str] = set()
        for i, frame in enumerate(frames):
            m = _FRAME.match(frame.strip())
            if m is None or focus not in m.group("file"):
                continue
            name = f"{m.group('func')} ({_short(m.group('file'))})"
            if name not in seen:
                seen.add(name)
                inclusive[name] += count
            if i == len(frames) - 1:
                own[name] += count
    return total, inclusive, own


def profile(ctx: Context) -> Scenario:
    """Profile the 6-rule sniffing responder under new-connection load."""
    scenario = Scenario("profile", "Profile: the sniffer under new-connection load (py-spy)", None, [
        Metric("close_req_s", "new connections while profiled", "conn/s"),
    ])  # fmt: skip
    py_spy = ensure_py_spy(ctx.log)
    if py_spy is None:
        scenario.skip("profile", "py-spy could not be installed")
        return scenario
    seconds = max(2.0, ctx.seconds)
    with Servers(ctx.workdir) as servers:
        server, port = start_python(ctx, servers, "responder-sniff-profiled", "responder-sniff")
        out = ctx.workdir / "profile.txt"
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(server.pid), "--duration", str(int(seconds) + 1), "--rate", "250",
             "--format", "raw", "--nonblocking", "--output", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            figures = _load.wrk(
                f"http://127.0.0.1:{port}/", seconds=seconds, connections=ctx.connections, close=True,
                prefix=ctx.load_cpu,
            )  # fmt: skip
            scenario.add("muxtwist SniffingFactory (6th of 6)", {"close_req_s": figures["req_s"]})
        except _load.LoadFailed as e:
            scenario.notes.append(f"wrk failed while profiling: {e}")
        try:
            _, err = spy.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
    if not out.exists():
        scenario.skip("profile", f"py-spy wrote nothing: {err.decode(errors='replace')[-300:]}")
        return scenario
    raw = out.read_text()
    Path(ctx.workdir / "profile-raw.txt").write_text(raw)
    total, inclusive, own = fold(raw)
    scenario.extra["samples"] = total
    scenario.extra["inclusive"] = {k: v / total for k, v in inclusive.most_common(15)} if total else {}
    scenario.extra["self"] = {k: v / total for k, v in own.most_common(15)} if total else {}
    all_own = fold(raw, focus="")[2]
    scenario.extra["self_all"] = {k: v / total for k, v in all_own.most_common(12)} if total else {}
    ctx.profile_out["raw"] = raw
    if total:
        share = sum(own.values()) / total
        scenario.notes.append(
            f"{total} samples; {share:.1%} of them with a muxtwist function on top of the stack "
            f"(the rest: Twisted's reactor and TCP transport, the responder, the interpreter)."
        )
        for k, v in inclusive.most_common(8):
            scenario.notes.append(f"inclusive {v / total:.1%}, self {own.get(k, 0) / total:.1%}: `{k}`")
    return scenario
