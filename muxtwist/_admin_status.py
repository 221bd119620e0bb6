"""
The numbers of one process, as ``/status.json`` serves them and the stats
page shows them: each listener with its rules and backends (live and total
connections, bytes each way, outcomes, health) and the limit refusals.

Backends are read through :class:`~muxtwist.interfaces.IBackendPool` only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from muxtwist._twisted import default_reactor
from muxtwist.interfaces import BackendState, RelayState
from muxtwist.metrics import LIMITS, Metrics, Tracked, backend_pools, default_metrics, nested_sniffers

__all__ = ["status", "this_worker_slot"]


def _factories(service: Any, metrics: Metrics) -> list[tuple[str, Tracked]]:
    listeners = getattr(service, "listeners", None)
    if listeners is not None:
        return [(description, listener.factory) for description, listener in sorted(listeners.items())]
    # No service: every sniffing factory these metrics read, outermost ones only.
    tracked = metrics.factories
    inner = {id(f) for factory in tracked for f in nested_sniffers(factory)}
    return [(f"listener {i + 1}", f) for i, f in enumerate(f for f in tracked if id(f) not in inner)]


def _rule_row(name: str, stats: Any) -> dict[str, Any]:
    return {
        "name": name,
        "live": stats.active,
        "total": stats.total,
        "bytes_in": getattr(stats, "bytes_in", 0),
        "bytes_out": getattr(stats, "bytes_out", 0),
        "outcomes": dict(getattr(stats, "outcomes", {})),
    }


def _backend_row(rule_name: str, state: BackendState, live: Sequence[RelayState]) -> dict[str, Any]:
    """A backend's row: ``state``, plus the bytes its relays still open (``live``) have moved."""
    return {
        "rule": rule_name,
        "backend": state.description,
        "live": state.active,
        "total": state.total,
        "bytes_in": state.bytes_in + sum(r.bytes_in for r in live),
        "bytes_out": state.bytes_out + sum(r.bytes_out for r in live),
        "failures": state.failures,
        "errors": dict(state.errors),
        "checked": state.checked,
        "healthy": state.healthy,
        "since": state.since,
        "last_check": state.last_check,
        "last_check_at": state.last_check_at,
        "skipped_until": state.skipped_until,
    }


def _listener_status(description: str, factory: Any) -> dict[str, Any]:
    names = [r.name for r in factory.rules] + ["on_timeout", "on_no_match"]
    names += sorted(set(factory.stats) - set(names))  # rules removed by a reload, and "-"
    rules = {n: _rule_row(n, factory.stats[n]) for n in names if n in factory.stats}
    backends = []
    for rule_name, pool in backend_pools(factory):
        # A pool that is this rule's own factory may serve other rules of the
        # list too: this rule's rows count only its own relays.
        direct = any(r.name == rule_name and r.factory is pool for r in factory.rules)
        live = [r for r in pool.open_relays() if not direct or r.rule == rule_name]
        row = rules.get(rule_name)
        if row is not None:
            # Bytes of relays still open, so a long transfer shows while it runs.
            row["bytes_in"] += sum(r.bytes_in for r in live)
            row["bytes_out"] += sum(r.bytes_out for r in live)
        by_backend: dict[str, list[RelayState]] = {}
        for relay in live:
            by_backend.setdefault(relay.backend, []).append(relay)
        for state in pool.backend_states():
            backends.append(_backend_row(rule_name, state, by_backend.get(state.description, [])))
    rows = list(rules.values())
    named = [r for r in rows if r["name"] != "-"]
    outcomes: dict[str, int] = {}
    for r in rows:
        for outcome, n in r["outcomes"].items():
            outcomes[outcome] = outcomes.get(outcome, 0) + n
    return {
        "endpoint": description,
        "live": sum(r["live"] for r in named),
        "sniffing": sum(1 for c in list(factory.connections) if c.sniffing),
        "total": sum(outcomes.values()) + len(factory.connections),
        "bytes_in": sum(r["bytes_in"] for r in rows),
        "bytes_out": sum(r["bytes_out"] for r in rows),
        "outcomes": outcomes,
        "rules": rows,
        "backends": backends,
    }


def status(service: Any = None, metrics: Metrics | None = None, reactor: Any = None) -> dict[str, Any]:
    """
    The numbers of this process: each listener with its rules and backends
    (live and total connections, bytes each way, outcomes, health), and the
    limit refusals. ``/status.json`` serves it; the stats page shows it.

    :param service: a :class:`~muxtwist.service.MuxService`; without one,
        every sniffing factory counting into ``metrics`` is shown.
    """
    if metrics is None:
        metrics = getattr(service, "metrics", None) or default_metrics()
    reactor = default_reactor(reactor)
    return {
        "time": reactor.seconds(),
        "draining": bool(getattr(service, "draining", False)),
        "workers": [{"slot": this_worker_slot(), "pid": os.getpid(), "answered": True}],
        "listeners": [_listener_status(d, f) for d, f in _factories(service, metrics)],
        "limit_rejections": {
            limit: int(metrics.value("muxtwist_limit_rejections_total", limit=limit)) for limit in LIMITS
        },
    }


def this_worker_slot() -> int | None:
    """This process's slot in a ``--workers`` pool (``MUXTWIST_WORKER``), or ``None`` outside one."""
    slot = os.environ.get("MUXTWIST_WORKER")
    return int(slot) if slot is not None and slot.isdigit() else None
