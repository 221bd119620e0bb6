"""
Summing the numbers of the workers of a ``--workers`` pool: their statuses
(:func:`merge_status`) and their Prometheus metric families
(:func:`merge_metrics`), with summed counts that never go back when a
worker dies or is replaced (:class:`StatusMemory`, :class:`CounterMemory`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

__all__ = [
    "CounterMemory",
    "StatusMemory",
    "cumulative_status",
    "exposition",
    "merge_families",
    "merge_metrics",
    "merge_status",
]

_SUMMED = ("live", "sniffing", "total", "bytes_in", "bytes_out", "failures")
#: The fields of a status row that only grow while a worker lives (the others are gauges).
_CUMULATIVE_FIELDS = ("total", "bytes_in", "bytes_out", "failures")
_CUMULATIVE_TABLES = ("outcomes", "errors")


def _add_counts(into: dict[str, Any], row: dict[str, Any]) -> None:
    for key in _SUMMED:
        if key in row:
            into[key] = into.get(key, 0) + row[key]
    _add_tables(into, row)


def _add_cumulative(into: dict[str, Any], row: dict[str, Any]) -> None:
    """Add only the counts of ``row`` that never go back while a worker lives (not live, sniffing)."""
    for key in _CUMULATIVE_FIELDS:
        if key in row:
            into[key] = into.get(key, 0) + row[key]
    _add_tables(into, row)


def _add_tables(into: dict[str, Any], row: dict[str, Any]) -> None:
    for key in _CUMULATIVE_TABLES:
        if key in row:
            merged = into.setdefault(key, {})
            for k, n in row[key].items():
                merged[k] = merged.get(k, 0) + n


def _merge_backend(into: dict[str, Any] | None, row: dict[str, Any]) -> dict[str, Any]:
    if into is None:
        into = {k: v for k, v in row.items() if k not in (*_SUMMED, "errors")}
        into["healthy_in"] = 0
        into["workers"] = 0
    _add_counts(into, row)
    into["workers"] += 1
    into["healthy_in"] += 1 if row["healthy"] else 0
    into["healthy"] = into["healthy_in"] == into["workers"]
    # The backend has been in its (merged) state since the latest change any worker saw.
    into["since"] = max((t for t in (into.get("since"), row.get("since")) if t is not None), default=None)
    if (row.get("last_check_at") or 0) > (into.get("last_check_at") or 0):
        into["last_check"], into["last_check_at"] = row.get("last_check"), row.get("last_check_at")
    into["skipped_until"] = max(
        (t for t in (into.get("skipped_until"), row.get("skipped_until")) if t is not None), default=None
    )
    return into


def merge_status(
    parts: Sequence[dict[str, Any]],
    now: float,
    draining: bool = False,
    kept: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """
    One status from the statuses of several workers: connections, bytes and
    outcomes summed; a backend is healthy when it is healthy in every worker.

    :param kept: the :func:`cumulative_status` of workers that did not
        answer, and of workers since replaced (see :class:`StatusMemory`):
        their totals, bytes, outcomes, errors, failures and limit rejections
        are added, so that the sums never go back. They add nothing to live
        connections or health, and add to a backend's row only when an
        answering worker still reports that backend.
    """
    listeners: dict[str, dict[str, Any]] = {}
    rules: dict[tuple[str, str], dict[str, Any]] = {}
    backends: dict[tuple[str, str, str], dict[str, Any]] = {}
    limits: dict[str, int] = {}
    workers: list[dict[str, Any]] = []
    for part in parts:
        for worker in part.get("workers", []):
            # Each part is one process: its own live and total connections, to see how the kernel spreads them.
            worker = dict(worker)
            worker["live"] = sum(listener["live"] for listener in part.get("listeners", []))
            worker["total"] = sum(listener["total"] for listener in part.get("listeners", []))
            workers.append(worker)
        for limit, n in part.get("limit_rejections", {}).items():
            limits[limit] = limits.get(limit, 0) + n
        for listener in part.get("listeners", []):
            endpoint = listener["endpoint"]
            into = listeners.setdefault(endpoint, {"endpoint": endpoint, "rules": [], "backends": []})
            _add_counts(into, listener)
            for row in listener["rules"]:
                key = (endpoint, row["name"])
                if key not in rules:
                    rules[key] = {"name": row["name"]}
                    into["rules"].append(rules[key])
                _add_counts(rules[key], row)
            for row in listener["backends"]:
                bkey = (endpoint, row["rule"], row["backend"])
                merged = _merge_backend(backends.get(bkey), row)
                if bkey not in backends:
                    backends[bkey] = merged
                    into["backends"].append(merged)
    for part in kept:
        for limit, n in part.get("limit_rejections", {}).items():
            limits[limit] = limits.get(limit, 0) + n
        for listener in part.get("listeners", []):
            endpoint = listener["endpoint"]
            empty = {"endpoint": endpoint, "live": 0, "sniffing": 0, "rules": [], "backends": []}
            into = listeners.setdefault(endpoint, empty)
            _add_cumulative(into, listener)
            for row in listener["rules"]:
                key = (endpoint, row["name"])
                if key not in rules:
                    rules[key] = {"name": row["name"], "live": 0}
                    into["rules"].append(rules[key])
                _add_cumulative(rules[key], row)
            for row in listener["backends"]:
                # Only to a backend an answering worker reports: its health and the
                # workers it is healthy in are the answering workers' alone.
                backend = backends.get((endpoint, row["rule"], row["backend"]))
                if backend is not None:
                    _add_cumulative(backend, row)
    return {
        "time": now,
        "draining": draining,
        "workers": workers,
        "listeners": list(listeners.values()),
        "limit_rejections": limits,
    }


def _counts(row: dict[str, Any], *names: str) -> dict[str, Any]:
    """``row``'s identifying fields ``names`` and its cumulative counts (copied)."""
    kept = {name: row[name] for name in names}
    kept.update((k, row[k]) for k in _CUMULATIVE_FIELDS if k in row)
    kept.update((k, dict(row[k])) for k in _CUMULATIVE_TABLES if k in row)
    return kept


def cumulative_status(part: dict[str, Any]) -> dict[str, Any]:
    """
    Only the counts of one worker's status that never go back while it
    lives (totals, bytes, outcomes, errors, failures, limit rejections), for
    :func:`merge_status`'s ``kept``; live connections and health are left out.
    """
    return {
        "listeners": [
            {
                **_counts(listener, "endpoint"),
                "rules": [_counts(row, "name") for row in listener.get("rules", [])],
                "backends": [_counts(row, "rule", "backend") for row in listener.get("backends", [])],
            }
            for listener in part.get("listeners", [])
        ],
        "limit_rejections": dict(part.get("limit_rejections", {})),
    }


def _fold(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """One :func:`cumulative_status` with the counts of both (every backend row of both kept)."""
    listeners: dict[str, dict[str, Any]] = {}
    limits: dict[str, int] = {}
    for part in (a, b):
        for limit, n in part.get("limit_rejections", {}).items():
            limits[limit] = limits.get(limit, 0) + n
        for listener in part.get("listeners", []):
            endpoint = listener["endpoint"]
            into = listeners.setdefault(endpoint, {"endpoint": endpoint, "rules": {}, "backends": {}})
            _add_cumulative(into, listener)
            for row in listener.get("rules", []):
                _add_cumulative(into["rules"].setdefault(row["name"], {"name": row["name"]}), row)
            for row in listener.get("backends", []):
                key = (row["rule"], row["backend"])
                _add_cumulative(into["backends"].setdefault(key, {"rule": row["rule"], "backend": row["backend"]}), row)
    return {
        "listeners": [
            {**listener, "rules": list(listener["rules"].values()), "backends": list(listener["backends"].values())}
            for listener in listeners.values()
        ],
        "limit_rejections": limits,
    }


class StatusMemory:
    """
    Keeps the summed counts of a pool's status from going back when a worker
    dies, as :class:`CounterMemory` does for ``/metrics``: a worker that does
    not answer counts with the cumulative fields of what it last answered,
    and once a new worker answers in its slot, the old one's last counts are
    folded into one retired record that stays added for good. A late answer
    from a worker already replaced is taken as no answer.
    """

    #: How many replaced workers are remembered, to recognise a late answer from one.
    REMEMBERED = 64

    def __init__(self) -> None:
        #: Per slot: the instance that answered last, its time and its :func:`cumulative_status`.
        self.last: dict[str, tuple[str, float, dict[str, Any]]] = {}
        #: What every replaced worker counted, summed.
        self.retired: dict[str, Any] = {"listeners": [], "limit_rejections": {}}
        self._retired_order: deque[str] = deque()
        self.retired_instances: set[str] = set()

    def _retire(self, instance: str, counts: dict[str, Any]) -> None:
        self.retired = _fold(self.retired, counts)
        self.retired_instances.add(instance)
        self._retired_order.append(instance)
        while len(self._retired_order) > self.REMEMBERED:
            self.retired_instances.discard(self._retired_order.popleft())

    def parts(
        self, answers: Sequence[tuple[str, dict[str, Any] | None, str | None]]
    ) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, Any]]]:
        """
        For one gathering of ``(slot name, status or None, instance)``: the
        answers to sum as they are (with their slot names), and what to add
        for the rest (see :func:`merge_status`'s ``kept``).
        """
        answering: list[tuple[str, dict[str, Any]]] = []
        kept: list[dict[str, Any]] = []
        for name, part, instance in answers:
            if part is not None and instance is not None and instance in self.retired_instances:
                part = None  # a late answer from a worker already replaced: its counts are retired
            old = self.last.get(name)
            if part is None:
                if old is not None:
                    kept.append(old[2])
                continue
            if old is not None and old[0] != instance:
                self._retire(old[0], old[2])
                del self.last[name]
                old = None
            if instance is not None:
                when = float(part.get("time") or 0.0)
                # Answers of one worker that arrive out of order: keep its newest counts.
                if old is None or when >= old[1]:
                    self.last[name] = (instance, when, cumulative_status(part))
            answering.append((name, part))
        if self.retired["listeners"] or self.retired["limit_rejections"]:
            kept.append(self.retired)
        return answering, kept


def merge_metrics(texts: Iterable[str]) -> list[Metric]:
    """
    The metric families of several workers' ``/metrics`` as one: each
    sample summed over the workers, except ``muxtwist_backend_up`` (the
    lowest: 1 only when every worker can use the backend) and ``_created``
    timestamps (the earliest).
    """
    return merge_families(list(text_string_to_metric_families(text)) for text in texts)


def merge_families(parts: Iterable[Iterable[Metric]]) -> list[Metric]:
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for part in parts:
        for family in part:
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = samples.get(key)
                if old is None:
                    samples[key] = sample.value
                elif sample.name == "muxtwist_backend_up" or sample.name.endswith("_created"):
                    samples[key] = min(old, sample.value)
                else:
                    samples[key] = old + sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(families.values())


#: Families whose samples only grow while a process lives.
_CUMULATIVE = ("counter", "histogram", "summary")


class CounterMemory:
    """
    Keeps the summed counters of a pool from going back when a worker dies:
    a worker that does not answer counts with what it last answered, and
    once a new worker answers in its slot, the old one's last counts stay
    added for good, as prometheus-client's multiprocess mode keeps the
    counts of dead processes. Gauges (live connections, backend up) are
    only ever the answering workers'.
    """

    def __init__(self) -> None:
        #: Per slot: the instance that answered last and its cumulative families.
        self.last: dict[str, tuple[str, list[Metric]]] = {}
        self.retired: list[Metric] = []
        self.retired_instances: set[str] = set()

    def parts(self, answers: Sequence[tuple[str, bytes | None, str | None]]) -> list[list[Metric]]:
        """The families to sum for one scrape: each slot's, and what replaced workers counted."""
        parts = []
        for name, body, instance in answers:
            if body is not None and instance in self.retired_instances:
                body = None  # a late answer from a worker already replaced: its counts are retired
            if body is None:
                kept = self.last.get(name)
                if kept is not None:
                    parts.append(kept[1])
                continue
            families = list(text_string_to_metric_families(body.decode("utf-8")))
            old = self.last.get(name)
            if old is not None and old[0] != instance:
                self.retired = merge_families([self.retired, old[1]])
                self.retired_instances.add(old[0])
                del self.last[name]  # retired once, even if the new worker names no instance
            if instance is not None:
                self.last[name] = (instance, [f for f in families if f.type in _CUMULATIVE])
            parts.append(families)
        parts.append(self.retired)
        return parts


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def exposition(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)
