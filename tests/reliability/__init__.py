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

import attrs

from tests.reliability.harness import Row

__all__ = ["SCENARIOS", "Scenario", "run_scenario"]


Scenario = Callable[[], "Row | list[Row]"]


def _scenarios() -> list[Scenario]:
    from tests.reliability import attacks, faults, hostile, lifecycle, load

    return [
        load.mixed_load,
        load.byte_dribble,
        hostile.hostile_clients,
        hostile.untrusted_proxy_headers,
        lifecycle.shutdown_under_load,
        lifecycle.reload_under_load,
        faults.backend_faults,
        attacks.tls_close,
        attacks.silent_untrusted_clients,
        attacks.trusted_cut_short_headers,
        attacks.log_hygiene,
        attacks.sighup_storms,
        attacks.host_ambiguity,
        attacks.echo_backpressure,
        attacks.stalled_handshakes,
    ]


SCENARIOS: list[Scenario] = _scenarios()


def run_scenario(scenario: Scenario) -> list[Row]:
    """Run one scenario (some give a row per phase); an exception makes a red row that says what it was."""
    started = time.monotonic()
    try:
        result = scenario()
    except Exception as e:
        name = (scenario.__doc__ or scenario.__name__).strip().splitlines()[0]
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        result = Row(scenario.__name__, name, "-", f"the scenario itself failed: {tb}", False)
    rows = result if isinstance(result, list) else [result]
    seconds = round((time.monotonic() - started) / len(rows), 1)
    return [attrs.evolve(r, seconds=seconds) for r in rows]
