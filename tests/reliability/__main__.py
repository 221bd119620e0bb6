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
runs the same scenarios in the normal test run; the fuzzing of every parser
is described at the end.

This page is generated: regenerate it with

    python -m tests.reliability

"""


#: Red rows that are understood: scenario name -> why, and what is being done.
KNOWN: dict[str, str] = {}

FUZZING = """
## Fuzzing

Every parser has an atheris harness in `fuzz/` (`fuzz_tls.py`, `fuzz_http_head.py`,
`fuzz_http2.py` (frames and HPACK), `fuzz_proxy_protocol.py` (v1, v2 and the
connection-side reader), `fuzz_redis.py`, `fuzz_postgresql.py`, `fuzz_mqtt.py`,
`fuzz_socks.py`, and `fuzz_others.py` for SSH, XMPP, WebSocket, RDP and
OpenVPN). Each checks that the parser never raises on any input and that a
verdict, once decided on a prefix of the stream, stands for the whole of it.
`fuzz/run.sh` runs each for 20 seconds (`FUZZ_SECONDS`) from a seed corpus of
real openers, in `.ci/run`; crash inputs land in `fuzz/crashes/` and become
regression tests in `tests/test_fuzz_regressions.py`. The same targets run
under hypothesis in the normal test run (`tests/test_fuzz_harnesses.py`).
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
    if red:
        lines.append("\n## Not green\n")
        for r in red:
            why = KNOWN.get(r.name, "not yet explained: a regression to look into.")
            lines.append(f"- **{r.name}**: {r.result}. Why: {why}")
    lines.append(FUZZING)
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
