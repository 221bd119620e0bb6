"""
The reliability suite: scenarios that run a real muxtwist on 127.0.0.1 and
push it with load, hostile clients, failing backends, stops and reloads.

Each scenario is a function returning a :class:`~tests.reliability.harness.Row`
(what was tried, how many times, what happened, green or red), bounded in
connections and time. ``tests/test_reliability.py`` runs them in the normal
test run; ``python -m tests.reliability`` runs them all and writes
``docs/reliability.md``.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable

from tests.reliability.harness import Row

__all__ = ["SCENARIOS", "run_scenario"]


def _scenarios() -> list[Callable[[], Row]]:
    from tests.reliability import load

    return [load.mixed_load, load.byte_dribble]


SCENARIOS: list[Callable[[], Row]] = _scenarios()


def run_scenario(scenario: Callable[[], Row]) -> Row:
    """Run one scenario; an exception makes a red row that says what it was."""
    started = time.monotonic()
    try:
        row = scenario()
    except Exception as e:
        name = (scenario.__doc__ or scenario.__name__).strip().splitlines()[0]
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        row = Row(scenario.__name__, name, "-", f"the scenario itself failed: {tb}", False)
    return Row(row.name, row.tried, row.times, row.result, row.green, round(time.monotonic() - started, 1))
