"""
Summing the numbers of the workers of a ``--workers`` pool: their statuses
(:func:`merge_status`) and their Prometheus metric families
(:func:`merge_metrics`), with summed counters that never go back when a
worker dies or is replaced (:class:`CounterMemory`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

__all__ = ["CounterMemory", "exposition", "merge_families", "merge_metrics", "merge_status"]

_SUMMED = ("live", "sniffing", "total", "bytes_in", "bytes_out", "failures")


def _add_counts(into: dict[str, Any], row: dict[str, Any]) -> None:
    for key in _SUMMED:
        if key in row:
            into[key] = into.get(key, 0) + row[key]
    for key in ("outcomes", "errors"):
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


def merge_status(parts: Sequence[dict[str, Any]], now: float, draining: bool = False) -> dict[str, Any]:
    """
    One status from the statuses of several workers: connections, bytes and
    outcomes summed; a backend is healthy when it is healthy in every worker.
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
    return {
        "time": now,
        "draining": draining,
        "workers": workers,
        "listeners": list(listeners.values()),
        "limit_rejections": limits,
    }


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
