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
clients driven from a separate process; every scenario ends with a leak
check (the server's open descriptors and pending delayed calls back to their
baseline). `tests/test_reliability.py` runs the same scenarios in the normal
test run.

This page is generated: regenerate it with

    python -m tests.reliability

"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: list[Row], elapsed: float) -> str:
    """The Markdown page for these results."""
    lines = [INTRO]
    red = [r for r in rows if not r.green]
    lines.append(
        f"Last run: {time.strftime('%Y-%m-%d')}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {elapsed:.0f} s in total: "
        + (f"**{len(red)} of {len(rows)} red**." if red else f"all {len(rows)} green.")
        + "\n"
    )
    lines.append("| Scenario | What was tried | How many | Result | |")
    lines.append("|---|---|---|---|---|")
    for r in rows:
        mark = "green" if r.green else "**red**"
        lines.append(f"| {_cell(r.name)} | {_cell(r.tried)} | {_cell(r.times)} | {_cell(r.result)} | {mark} |")
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    started = time.monotonic()
    rows = []
    for scenario in SCENARIOS:
        for row in run_scenario(scenario):
            print(f"{'green' if row.green else 'RED  '} {row.seconds:6.1f}s {row.name}: {row.result}", flush=True)
            rows.append(row)
    with open(DOC, "w") as f:
        f.write(render(rows, time.monotonic() - started))
    print(f"wrote {DOC}")
    return 0 if all(r.green for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
