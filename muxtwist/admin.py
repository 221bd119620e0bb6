"""
The admin site: an HTML stats page at ``/`` (per listener, rule and backend:
live and total connections, bytes each way, outcomes, backend health), the
numbers behind it at ``/status.json``, ``/metrics`` (Prometheus text
exposition) and ``/ready`` (readiness for load balancers and orchestrators).

It is an ordinary ``Site``, so it can be a rule of its own listener::

    Rule(HTTP1(path="/metrics"), admin_site())

or served on a separate endpoint with ``twistd muxtwist --admin tcp:9100``.

Under ``--workers N`` every worker serves its own numbers on a private UNIX
socket in the directory named by ``MUXTWIST_WORKERS_DIR`` (``/worker/metrics``
and ``/worker/status.json``); an admin site that finds that variable (or is
given ``peers=``) asks every worker and answers with the sum.
"""

from __future__ import annotations

import html
import json
import os
import re
import stat
import uuid
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from muxtwist._twisted import default_reactor
from muxtwist.interfaces import BackendState, RelayState
from muxtwist.metrics import LIMITS, Metrics, Tracked, backend_pools, default_metrics, nested_sniffers

__all__ = [
    "MetricsResource",
    "ReadyResource",
    "StatsPage",
    "StatusResource",
    "WorkerPeers",
    "admin_site",
    "merge_metrics",
    "merge_status",
    "render_page",
    "status",
]

log = Logger()

#: The environment variable a ``--workers`` parent sets for its workers:
#: the directory holding each worker's private admin socket.
WORKERS_DIR_ENV = "MUXTWIST_WORKERS_DIR"

#: Seconds the aggregating admin waits for each worker's numbers.
PEER_TIMEOUT = 2.0

#: Seconds between two refreshes of the stats page in the browser.
REFRESH_SECONDS = 2


class _Stoppable(Protocol):
    """What ``/ready`` and ``status()`` read from a service (``MuxService`` or ``WorkerPool``)."""

    running: int

    @property
    def draining(self) -> bool: ...


# The numbers


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
        "workers": [{"slot": _slot(), "pid": os.getpid(), "answered": True}],
        "listeners": [_listener_status(d, f) for d, f in _factories(service, metrics)],
        "limit_rejections": {
            limit: int(metrics.value("muxtwist_limit_rejections_total", limit=limit)) for limit in LIMITS
        },
    }


def _slot() -> int | None:
    slot = os.environ.get("MUXTWIST_WORKER")
    return int(slot) if slot is not None and slot.isdigit() else None


# Merging the numbers of several workers

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
    return _merge_families(list(text_string_to_metric_families(text)) for text in texts)


def _merge_families(parts: Iterable[Iterable[Metric]]) -> list[Metric]:
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

#: The response header naming one worker's admin site (a new one for each worker started).
INSTANCE_HEADER = b"x-muxtwist-instance"


class _CounterMemory:
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
                self.retired = _merge_families([self.retired, old[1]])
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


def _exposition(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


@implementer(IAgentEndpointFactory)
class _UNIXSockets:
    """Agent endpoints for ``http://worker-N/...``: the socket ``worker-N.sock`` in one directory."""

    def __init__(self, reactor: Any, directory: str) -> None:
        self.reactor = reactor
        self.directory = directory

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        name = uri.host.decode("ascii")
        return UNIXClientEndpoint(self.reactor, os.path.join(self.directory, f"{name}.sock"), timeout=PEER_TIMEOUT)


def _worker_slot(filename: str) -> int | None:
    """N for ``worker-N.sock``; None for any other name."""
    match = re.fullmatch(r"worker-([0-9]{1,6})\.sock", filename)
    return int(match.group(1)) if match else None


class WorkerPeers:
    """
    The workers of a ``--workers`` pool, reached through their private admin
    sockets (``worker-N.sock`` in ``directory``).
    """

    def __init__(self, directory: str, reactor: Any = None, expected: Callable[[], int] | None = None) -> None:
        reactor = default_reactor(reactor)
        self.directory = directory
        self._reactor = reactor
        self._agent = Agent.usingEndpointFactory(reactor, _UNIXSockets(reactor, directory))
        self._expected = expected
        self._warned = False

    def names(self) -> list[str]:
        """
        ``worker-N`` for each worker, in slot order: every slot of the pool
        when its size is known (a worker being restarted has no socket, and
        shows as not answering), else each ``worker-N.sock`` in the directory.
        None when the directory is not this user's (or root's) and closed to
        everyone else: whoever can write there could plant a socket and answer
        for a worker.
        """
        if not self._trusted():
            return []
        if self._expected is not None:
            return [f"worker-{slot}" for slot in range(self._expected())]
        try:
            entries = os.listdir(self.directory)
        except OSError:
            return []
        slots = [_worker_slot(e) for e in entries]
        return [f"worker-{slot}" for slot in sorted(s for s in slots if s is not None)]

    def _trusted(self) -> bool:
        try:
            info = os.stat(self.directory)
        except OSError:
            return False
        if stat.S_ISDIR(info.st_mode) and info.st_uid in (0, os.geteuid()) and not info.st_mode & 0o022:
            return True
        if not self._warned:
            self._warned = True
            log.warn(
                "admin: not asking the workers in {directory}: it must be a directory of this user's"
                " (or root's) that no one else can write to",
                directory=self.directory,
            )
        return False

    @property
    def expected(self) -> int:
        """How many workers there should be (the pool's count, or the sockets found)."""
        return self._expected() if self._expected is not None else len(self.names())

    def fetch(self, path: str) -> defer.Deferred[list[tuple[str, bytes | None]]]:
        """``GET path`` from every worker; ``None`` for a worker that did not answer in time."""

        def bodies(answers: list[tuple[str, bytes | None, str | None]]) -> list[tuple[str, bytes | None]]:
            return [(name, body) for name, body, _ in answers]

        return self.fetch_answers(path).addCallback(bodies)

    def fetch_answers(self, path: str) -> defer.Deferred[list[tuple[str, bytes | None, str | None]]]:
        """
        ``GET path`` from every worker: its name, the body (``None`` for a
        worker that did not answer in time) and which worker process it was
        (the ``X-Muxtwist-Instance`` header).
        """
        names = self.names()

        def one(name: str) -> defer.Deferred[tuple[str, bytes | None, str | None]]:
            d = self._agent.request(b"GET", f"http://{name}{path}".encode("ascii"))
            instance: list[str | None] = [None]

            def body(response: Any) -> Any:
                if response.code != 200:
                    raise ValueError(f"{name}{path} answered {response.code}")
                header = response.headers.getRawHeaders(INSTANCE_HEADER)
                instance[0] = header[0].decode("ascii", "replace") if header else None
                return readBody(response)

            d.addCallback(body)
            d.addTimeout(PEER_TIMEOUT, self._reactor)

            def answered(data: bytes) -> tuple[str, bytes | None, str | None]:
                return name, data, instance[0]

            def failed(reason: Failure) -> tuple[str, bytes | None, str | None]:
                log.warn("admin: no answer from {worker}: {problem}", worker=name, problem=reason.getErrorMessage())
                return name, None, None

            result: defer.Deferred[tuple[str, bytes | None, str | None]] = d.addCallbacks(answered, failed)
            return result

        return defer.gatherResults([one(n) for n in names])


# The page


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _fmt_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _e(value: object) -> str:
    """Every value goes through here: names, endpoints and reasons may come from users and clients."""
    return html.escape(str(value), quote=True)


def _outcomes(outcomes: dict[str, int]) -> str:
    if not outcomes:
        return "-"
    return ", ".join(f"{_e(k)}&nbsp;{_e(v)}" for k, v in sorted(outcomes.items()))


def _health(row: dict[str, Any], now: float) -> tuple[str, str]:
    """(css class, text) of a backend's health cell."""
    parts = []
    if row.get("skipped_until") is not None:
        cls, state = "down", "SKIPPED"
        parts.append(f"after failed connects, for {_fmt_age(row['skipped_until'] - now)} more")
    elif not row.get("healthy", True):
        cls, state = "down", "DOWN"
    elif row.get("workers", 1) > row.get("healthy_in", row.get("workers", 1)):
        cls, state = "down", "DOWN"
    else:
        cls, state = "up", "UP"
    if "workers" in row and row["workers"] > 1:
        parts.append(f"healthy in {row['healthy_in']} of {row['workers']} workers")
    if row.get("since") is not None:
        parts.insert(0, f"for {_fmt_age(now - row['since'])}")
    if not row.get("checked"):
        parts.append("no active check")
    elif row.get("last_check") is None:
        parts.append("not checked yet")
    else:
        parts.append(f"last check {row['last_check']} {_fmt_age(now - row['last_check_at'])} ago")
    return cls, f"{state} " + "; ".join(parts)


def render_page(data: dict[str, Any]) -> bytes:
    """The HTML stats page for a :func:`status` (or :func:`merge_status`) result."""
    now = data["time"]
    out = []
    workers = data.get("workers", [])
    if len(workers) > 1 or any(w.get("slot") is not None for w in workers):
        answered = [w for w in workers if w.get("answered")]
        pids = ", ".join(f"{_e(w.get('pid'))} ({_e(w.get('live', 0))} live)" for w in answered)
        out.append(f'<p id="workers">{len(answered)} of {len(workers)} workers answered: pids {pids}</p>')
    if data.get("draining"):
        out.append('<p class="down" id="draining">draining: stopping, /ready answers 503</p>')
    for listener in data["listeners"]:
        out.append(f'<section class="listener"><h2>{_e(listener["endpoint"])}</h2>')
        out.append(
            "<table><thead><tr><th>rule</th><th>live</th><th>total</th><th>bytes in</th><th>bytes out</th>"
            "<th>outcomes</th></tr></thead><tbody>"
        )
        out.append(
            f'<tr class="total"><td>listener (sniffing now: {_e(listener.get("sniffing", 0))})</td>'
            f"<td>{_e(listener['live'])}</td><td>{_e(listener['total'])}</td>"
            f"<td>{_e(_fmt_bytes(listener['bytes_in']))}</td><td>{_e(_fmt_bytes(listener['bytes_out']))}</td>"
            f"<td>{_outcomes(listener['outcomes'])}</td></tr>"
        )
        for rule in listener["rules"]:
            if rule["name"] == "-" and not rule["total"] and not rule["outcomes"]:
                continue
            label = "(ended while sniffing)" if rule["name"] == "-" else rule["name"]
            out.append(
                f'<tr class="rule" data-rule="{_e(rule["name"])}"><td>{_e(label)}</td>'
                f'<td class="live">{_e(rule["live"])}</td><td>{_e(rule["total"])}</td>'
                f"<td>{_e(_fmt_bytes(rule['bytes_in']))}</td><td>{_e(_fmt_bytes(rule['bytes_out']))}</td>"
                f"<td>{_outcomes(rule['outcomes'])}</td></tr>"
            )
        out.append("</tbody></table>")
        if listener["backends"]:
            out.append(
                "<table><thead><tr><th>rule</th><th>backend</th><th>health</th><th>live</th><th>total</th>"
                "<th>bytes in</th><th>bytes out</th><th>failures</th></tr></thead><tbody>"
            )
            for b in listener["backends"]:
                cls, text = _health(b, now)
                errors = ", ".join(f"{_e(k)}&nbsp;{_e(v)}" for k, v in sorted(b["errors"].items())) or "0"
                out.append(
                    f'<tr class="backend" data-backend="{_e(b["backend"])}"><td>{_e(b["rule"])}</td>'
                    f'<td>{_e(b["backend"])}</td><td class="health {cls}">{_e(text)}</td>'
                    f'<td class="live">{_e(b["live"])}</td><td>{_e(b["total"])}</td>'
                    f"<td>{_e(_fmt_bytes(b['bytes_in']))}</td><td>{_e(_fmt_bytes(b['bytes_out']))}</td>"
                    f"<td>{errors}</td></tr>"
                )
            out.append("</tbody></table>")
        out.append("</section>")
    limits = ", ".join(f"{_e(k)}&nbsp;{_e(v)}" for k, v in sorted(data["limit_rejections"].items()))
    out.append(f'<p id="limits">refused by limits: {limits}</p>')
    body = "".join(out)
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8"><title>muxtwist stats</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="stylesheet" href="stats.css"><script src="stats.js" defer></script>'
        f'<noscript><meta http-equiv="refresh" content="{REFRESH_SECONDS}"></noscript></head>'
        f'<body data-refresh="{REFRESH_SECONDS}"><header><h1>muxtwist stats</h1>'
        '<span id="updated">live</span> <a href="status.json">status.json</a> <a href="metrics">metrics</a></header>'
        f'<main id="stats">{body}</main></body></html>\n'
    ).encode()


# Resources

_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _headers(request: Request, content_type: bytes) -> None:
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"server", b"muxtwist")


class _SingleFlight:
    """
    One gathering at a time: callers that come while the workers are being
    asked get that same answer, so 100 scrapes at once cost each worker one
    request and the parent one merge.
    """

    def __init__(self) -> None:
        self._waiting: list[defer.Deferred[Any]] | None = None

    def run(self, start: Callable[[], defer.Deferred[Any]]) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        if self._waiting is not None:
            self._waiting.append(d)
            return d
        self._waiting = waiting = [d]

        def done(result: object) -> None:
            self._waiting = None
            for each in waiting:
                each.callback(result)  # a Failure goes down each one's errbacks

        start().addBoth(done)
        return d


class _Aggregating(Resource):
    """A resource answering with this process's numbers, or, given peers, every worker's summed."""

    isLeaf = True

    def __init__(self, service: Any, metrics: Metrics, peers: WorkerPeers | None, reactor: Any = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.service = service
        self.metrics = metrics
        self.peers = peers
        self._reactor = default_reactor(reactor)
        self._flight = _SingleFlight()
        self._rendering = _SingleFlight()

    def local_status(self) -> dict[str, Any]:
        return status(self.service, self.metrics, self._reactor)

    def gathered_status(self) -> defer.Deferred[dict[str, Any]]:
        """Every worker's status, merged (or this process's, without peers)."""
        peers = self.peers
        if peers is None:
            return defer.succeed(self.local_status())

        def merge(answers: list[tuple[str, bytes | None]]) -> dict[str, Any]:
            parts, missing = [], []
            for name, body in answers:
                if body is None:
                    missing.append(name)
                    continue
                part = json.loads(body)
                slot = int(name.partition("-")[2])
                for w in part.get("workers", []):
                    w["answered"] = True
                    w["slot"] = slot  # the socket it answered on
                parts.append(part)
            merged = merge_status(parts, self._reactor.seconds(), bool(getattr(self.service, "draining", False)))
            for name in missing:
                merged["workers"].append({"slot": int(name.partition("-")[2]), "answered": False})
            merged["workers"].sort(key=lambda w: w["slot"])
            return merged

        return self._flight.run(lambda: peers.fetch("/worker/status.json").addCallback(merge))

    def respond(self, request: Request, d: defer.Deferred[bytes]) -> int:
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def write(body: bytes) -> None:
            if not request.finished and not gone:
                request.write(body)
                request.finish()

        def failed(reason: Failure) -> None:
            log.failure("admin: cannot answer {path}", reason, path=request.path)
            if not request.finished:
                request.setResponseCode(500)
                request.write(b"error\n")
                request.finish()

        d.addCallbacks(write, failed)
        return NOT_DONE_YET


class StatusResource(_Aggregating):
    """``/status.json``: :func:`status`, summed over the workers under ``--workers``."""

    def render_GET(self, request: Request) -> int:
        _headers(request, b"application/json")
        return self.respond(request, self._rendering.run(lambda: self.gathered_status().addCallback(_json)))


class StatsPage(_Aggregating):
    """``/``: the HTML stats page (it reloads its numbers every few seconds)."""

    def render_GET(self, request: Request) -> int:
        _headers(request, b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", _CSP)
        request.setHeader(b"referrer-policy", b"no-referrer")
        return self.respond(request, self._rendering.run(lambda: self.gathered_status().addCallback(render_page)))


def _json(data: object) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode("utf-8") + b"\n"


class MetricsResource(_Aggregating):
    """The registry's samples in the Prometheus text format (summed over the workers under ``--workers``)."""

    def __init__(
        self,
        registry: CollectorRegistry | Metrics,
        peers: WorkerPeers | None = None,
        reactor: Any = None,
    ) -> None:
        metrics = registry if isinstance(registry, Metrics) else None
        super().__init__(None, metrics or default_metrics(), peers, reactor)
        self.registry = registry.registry if isinstance(registry, Metrics) else registry
        self._memory = _CounterMemory()

    def render_GET(self, request: Request) -> int | bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        if self.peers is None:
            return generate_latest(self.registry)
        return self.respond(request, self.scrape())

    def scrape(self) -> defer.Deferred[bytes]:
        """The exposition text: this process's, or every worker's summed."""
        peers = self.peers
        if peers is None:
            return defer.succeed(generate_latest(self.registry))

        def merge(answers: list[tuple[str, bytes | None, str | None]]) -> bytes:
            families = _merge_families(self._memory.parts(answers))
            workers = Metric("muxtwist_workers", "Worker processes the pool runs.", "gauge")
            workers.add_sample("muxtwist_workers", {}, peers.expected)
            answered = Metric("muxtwist_workers_answered", "Workers whose numbers are in this scrape.", "gauge")
            answered.add_sample("muxtwist_workers_answered", {}, sum(1 for _, body, _ in answers if body is not None))
            return _exposition([*families, workers, answered])

        return self._flight.run(lambda: peers.fetch_answers("/worker/metrics").addCallback(merge))


class _LocalMetrics(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.registry = registry
        # Tells the parent summing the workers when a slot has a new worker (whose counters start at 0).
        self.instance = f"{os.getpid()}-{uuid.uuid4().hex}".encode("ascii")

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(INSTANCE_HEADER, self.instance)
        return generate_latest(self.registry)


class _LocalStatus(Resource):
    isLeaf = True

    def __init__(self, service: Any, metrics: Metrics) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.service = service
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        _headers(request, b"application/json")
        return _json(status(self.service, self.metrics))


class _Static(Resource):
    isLeaf = True

    def __init__(self, name: str, content_type: bytes) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.body = resources.files("muxtwist").joinpath("admin_static", name).read_bytes()
        self.content_type = content_type

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"max-age=300")
        return self.body


class ReadyResource(Resource):
    """
    200 while the service serves, 503 once it is draining (or stopped), so a
    load balancer stops sending new clients before the listeners close.
    Without a service it is always ready: whoever can reach it is served.
    """

    isLeaf = True

    def __init__(self, service: Any | None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.service = service

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        service = self.service
        if service is None or (service.running and not service.draining):
            return b"ready\n"
        request.setResponseCode(503)
        return b"draining\n"

    render_HEAD = render_GET


def admin_site(
    service: Any | None = None,
    registry: CollectorRegistry | Metrics | None = None,
    *,
    peers: WorkerPeers | None = None,
    reactor: Any = None,
) -> Site:
    """
    A ``Site`` serving the stats page at ``/``, ``/status.json``,
    ``/metrics`` and ``/ready``.

    :param service: the :class:`~muxtwist.service.MuxService` whose listeners
        the page shows and whose draining ``/ready`` reports.
    :param registry: the registry (or :class:`~muxtwist.metrics.Metrics`) to
        expose; the process-wide one by default.
    :param peers: the workers to ask and sum; by default, the workers of the
        ``--workers`` pool this process is a worker of (``MUXTWIST_WORKER``
        and ``MUXTWIST_WORKERS_DIR`` set), if any.
    """
    if registry is None:
        registry = getattr(service, "metrics", None) or default_metrics()
    metrics = registry if isinstance(registry, Metrics) else default_metrics()
    raw = registry.registry if isinstance(registry, Metrics) else registry
    if peers is None and os.environ.get(WORKERS_DIR_ENV) and _slot() is not None:
        # Only in a worker (the parent names both): a process that merely
        # inherited the directory (started from a worker, or from a shell
        # that exported it) serves its own numbers, not another pool's.
        peers = WorkerPeers(os.environ[WORKERS_DIR_ENV], reactor)
    root = Resource()
    root.putChild(b"", StatsPage(service, metrics, peers, reactor))
    root.putChild(b"status.json", StatusResource(service, metrics, peers, reactor))
    root.putChild(b"metrics", MetricsResource(registry, peers, reactor))
    root.putChild(b"ready", ReadyResource(service))
    root.putChild(b"stats.css", _Static("stats.css", b"text/css; charset=utf-8"))
    root.putChild(b"stats.js", _Static("stats.js", b"text/javascript; charset=utf-8"))
    worker = Resource()
    worker.putChild(b"metrics", _LocalMetrics(raw))
    worker.putChild(b"status.json", _LocalStatus(service, metrics))
    root.putChild(b"worker", worker)
    site = Site(root)
    site.displayTracebacks = False
    site.noisy = False
    return site
