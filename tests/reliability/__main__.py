"""
``python -m tests.reliability``: run every scenario and write
``docs/reliability.md`` from the results.
"""

from __future__ import annotations

import os
import platform
import sys
import time

from tests.reliability import SCENARIOS, run_scenario
from tests.reliability.harness import Row
from tests.twistd import ROOT

DOC = os.path.join(ROOT, "docs", "reliability.md")

INTRO = """\
# Reliability

What muxtwist was put through, and what it did. Every row is a scenario of
`tests/reliability/`, run against a real `twistd muxtwist` on 127.0.0.1 with
clients driven from a separate process (`tests/reliability/client.py`, one
selector, plain sockets). Every scenario ends with a leak check: the
server's open descriptors (counted in `/proc/<pid>/fd`) and pending delayed
calls back to their baseline; the scenarios that stop the server check its
exit status and how long the stop took instead. Payloads are seeded random
bytes, checked by sha256 in both directions. `tests/test_reliability.py`
runs the same scenarios in the normal test run; the tests of the relay and
the sniffer that are not scenarios, and the fuzzing of every parser, are
described at the end.

This page is generated: regenerate it with

    python -m tests.reliability

The sections between `kept across runs` markers are written by hand and
kept as they are when the page is regenerated.

"""


HOSTILE = """
## Hostile clients

Attacks found by running hostile clients against `twistd muxtwist` with
real backends (issue 13), each a scenario of `tests/reliability/attacks.py`
against a real `twistd muxtwist` with its own rules file, ending with the
same leak check. The clients are Python sockets (and Python's `ssl`) in
threads of the suite's process; the backends are separate processes
(`tests/reliability/backend.py`, asyncio, TLS with Python's `ssl`) or
`twisted.web` inside the server. The figure is what was measured, the
details what else was seen.
"""

#: Red rows that are understood: scenario name -> why, and what is being done.
KNOWN: dict[str, str] = {}

#: Hand-written sections (tests of the normal run, the fuzzing campaign) sit
#: between these markers; regenerating the page keeps them, in order, after
#: the generated tables.
KEPT_BEGIN = "<!-- kept across runs: begin -->"
KEPT_END = "<!-- kept across runs: end -->"


def kept_sections(old: str) -> list[str]:
    """The blocks of ``old`` between :data:`KEPT_BEGIN` and :data:`KEPT_END`, markers included."""
    blocks = []
    at = old.find(KEPT_BEGIN)
    while at >= 0:
        end = old.find(KEPT_END, at)
        if end < 0:
            break
        blocks.append(old[at : end + len(KEPT_END)])
        at = old.find(KEPT_BEGIN, end)
    return blocks


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _mark(r: Row) -> str:
    return "green" if r.green else "**red**"


def render(rows: list[Row], elapsed: float, kept: list[str] | None = None, load: tuple[float, float] = (0, 0)) -> str:
    """The Markdown page for these results, with the hand-written ``kept`` sections at the end."""
    lines = [INTRO]
    red = [r for r in rows if not r.green]
    lines.append(
        f"Last run: {time.strftime('%Y-%m-%d')}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {elapsed:.0f} s in total: "
        + (f"**{len(red)} of {len(rows)} red**." if red else f"all {len(rows)} green.")
        + f" The machine was shared with other test runs (load average {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end), so times and latencies are those of a busy machine.\n"
    )
    lines.append("| Scenario | What was tried | How many | Result | |")
    lines.append("|---|---|---|---|---|")
    for r in rows:
        if r.table != "hostile":
            lines.append(f"| {_cell(r.name)} | {_cell(r.tried)} | {_cell(r.times)} | {_cell(r.result)} | {_mark(r)} |")
    hostile = [r for r in rows if r.table == "hostile"]
    if hostile:
        lines.append(HOSTILE)
        lines.append("| Attack | What was tried | How many | Figure | Details | |")
        lines.append("|---|---|---|---|---|---|")
        for r in hostile:
            lines.append(
                f"| {_cell(r.name)} | {_cell(r.tried)} | {_cell(r.times)} | {_cell(r.figure)} | "
                f"{_cell(r.result)} | {_mark(r)} |"
            )
    if red:
        lines.append("\n## Not green\n")
        for r in red:
            why = KNOWN.get(r.name, "not yet explained: a regression to look into.")
            lines.append(f"- **{r.name}**: {r.result}. Why: {why}")
    for block in kept or []:
        lines.append("\n" + block)
    return "\n".join(lines) + "\n"


def main() -> int:
    started = time.monotonic()
    load_start = os.getloadavg()[0]
    rows = []
    for scenario in SCENARIOS:
        for row in run_scenario(scenario):
            print(f"{'green' if row.green else 'RED  '} {row.seconds:6.1f}s {row.name}: {row.result}", flush=True)
            rows.append(row)
    old = ""
    if os.path.exists(DOC):
        with open(DOC) as f:
            old = f.read()
    page = render(rows, time.monotonic() - started, kept_sections(old), (load_start, os.getloadavg()[0]))
    with open(DOC, "w") as f:
        f.write(page)
    print(f"wrote {DOC}")
    return 0 if all(r.green for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
