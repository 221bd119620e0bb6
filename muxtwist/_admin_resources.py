"""
The admin site's resources: the stats page and ``/status.json`` (this
process's numbers, or every worker's summed), ``/metrics``, ``/ready``, the
page's static files, and ``/worker/...``, which serve one process's own
numbers to the parent summing a ``--workers`` pool.
"""

from __future__ import annotations

import json
import os
import uuid
import weakref
from collections.abc import Callable
from importlib import resources
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import pages
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from muxtwist._admin_merge import CounterMemory, StatusMemory, exposition, merge_families, merge_status
from muxtwist._admin_page import render_page
from muxtwist._admin_peers import INSTANCE_HEADER, WorkerPeers
from muxtwist._admin_status import status
from muxtwist._twisted import default_reactor
from muxtwist.metrics import Metrics, default_metrics

__all__ = [
    "Folder",
    "LocalMetrics",
    "LocalStatus",
    "MetricsResource",
    "ReadyResource",
    "StaticFile",
    "StatsPage",
    "StatusResource",
]

log = Logger(namespace="muxtwist.admin")


class _Stoppable(Protocol):
    """What ``/ready`` reads from a service (``MuxService`` or ``WorkerPool``)."""

    running: int

    @property
    def draining(self) -> bool: ...


_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _headers(request: Request, content_type: bytes) -> None:
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"server", b"muxtwist")


#: The methods every admin resource answers (HEAD as GET, without the body).
ALLOWED_METHODS = b"GET, HEAD"


class _Leaf(Resource):
    """
    An admin resource at one path, with nothing below it (``/ready/x`` and
    ``/ready/`` are 404, as any path with no resource), answering GET and
    HEAD only: OPTIONS answers 204 with ``Allow``, any other method 405
    with ``Allow`` (twisted.web alone answers OPTIONS, PUT or DELETE with
    501, as a method it does not know).
    """

    def getChild(self, path: bytes, request: Request) -> IResource:
        return pages.notFound()

    def render(self, request: Request) -> int | bytes:
        if request.method in (b"GET", b"HEAD"):
            body: int | bytes = super().render(request)  # type: ignore[no-untyped-call]
            return body
        request.setHeader(b"allow", ALLOWED_METHODS)
        request.setHeader(b"server", b"muxtwist")
        if request.method == b"OPTIONS":
            # No body and no Content-Length (RFC 9110, 8.6), which returning b"" would set.
            request.setResponseCode(204)
            request.finish()
            return NOT_DONE_YET
        request.setResponseCode(405)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"method not allowed: GET or HEAD\n"


class Folder(Resource):
    """A path that only holds others (``/worker``): 404 itself, whatever the method, and below it but its children."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def getChild(self, path: bytes, request: Request) -> IResource:
        return pages.notFound()

    def render(self, request: Request) -> bytes:
        body: bytes = pages.notFound().render(request)
        return body


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


#: The status memory of each pool's workers, shared by the page and ``/status.json`` asking them.
_status_memories: weakref.WeakKeyDictionary[WorkerPeers, StatusMemory] = weakref.WeakKeyDictionary()


def _status_memory(peers: WorkerPeers) -> StatusMemory:
    memory = _status_memories.get(peers)
    if memory is None:
        memory = _status_memories[peers] = StatusMemory()
    return memory


def _instance() -> bytes:
    """A name for one admin site of one process: tells the parent when a slot has a new worker."""
    return f"{os.getpid()}-{uuid.uuid4().hex}".encode("ascii")


class _Aggregating(_Leaf):
    """A resource answering with this process's numbers, or, given peers, every worker's summed."""

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

        # Counts of workers that died or were replaced stay added, as /metrics keeps them.
        memory = _status_memory(peers)

        def merge(answers: list[tuple[str, bytes | None, str | None]]) -> dict[str, Any]:
            decoded: list[tuple[str, dict[str, Any] | None, str | None]] = []
            for name, body, instance in answers:
                decoded.append((name, _status_body(name, body), instance))
            answering, kept = memory.parts(decoded)
            parts = []
            for name, part in answering:
                slot = int(name.partition("-")[2])
                for w in part.get("workers", []):
                    w["answered"] = True
                    w["slot"] = slot  # the socket it answered on
                parts.append(part)
            draining = bool(getattr(self.service, "draining", False))
            merged = merge_status(parts, self._reactor.seconds(), draining, kept=kept)
            answered = {name for name, _ in answering}
            for name, _, _ in answers:
                if name not in answered:
                    merged["workers"].append({"slot": int(name.partition("-")[2]), "answered": False})
            merged["workers"].sort(key=lambda w: w["slot"])
            return merged

        return self._flight.run(lambda: peers.fetch_answers("/worker/status.json").addCallback(merge))

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


def _status_body(name: str, body: bytes | None) -> dict[str, Any] | None:
    """A worker's ``/worker/status.json`` answer; ``None`` (as not answering) when there is none or it is no status."""
    if body is None:
        return None
    try:
        part = json.loads(body)
    except ValueError as e:
        log.warn("admin: {worker} answered no JSON: {problem}", worker=name, problem=str(e))
        return None
    if not isinstance(part, dict):
        log.warn("admin: {worker} answered JSON that is no status", worker=name)
        return None
    return part


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
        self._memory = CounterMemory()

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
            families = merge_families(self._memory.parts(answers))
            workers = Metric("muxtwist_workers", "Worker processes the pool runs.", "gauge")
            workers.add_sample("muxtwist_workers", {}, peers.expected)
            answered = Metric("muxtwist_workers_answered", "Workers whose numbers are in this scrape.", "gauge")
            answered.add_sample("muxtwist_workers_answered", {}, sum(1 for _, body, _ in answers if body is not None))
            return exposition([*families, workers, answered])

        return self._flight.run(lambda: peers.fetch_answers("/worker/metrics").addCallback(merge))


class LocalMetrics(_Leaf):
    """``/worker/metrics``: this process's own samples, named by the ``X-Muxtwist-Instance`` header."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.registry = registry
        # Tells the parent summing the workers when a slot has a new worker (whose counters start at 0).
        self.instance = _instance()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(INSTANCE_HEADER, self.instance)
        return generate_latest(self.registry)


class LocalStatus(_Leaf):
    """``/worker/status.json``: this process's own :func:`status`, named by the ``X-Muxtwist-Instance`` header."""

    def __init__(self, service: Any, metrics: Metrics) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.service = service
        self.metrics = metrics
        # Tells the parent summing the workers when a slot has a new worker (whose counts start at 0).
        self.instance = _instance()

    def render_GET(self, request: Request) -> bytes:
        _headers(request, b"application/json")
        request.setHeader(INSTANCE_HEADER, self.instance)
        return _json(status(self.service, self.metrics))


class StaticFile(_Leaf):
    """One file of ``admin_static/``: the stats page's script or style."""

    def __init__(self, name: str, content_type: bytes) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.body = resources.files("muxtwist").joinpath("admin_static", name).read_bytes()
        self.content_type = content_type

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"max-age=300")
        return self.body


class ReadyResource(_Leaf):
    """
    200 while the service serves, 503 once it is draining (or stopped), so a
    load balancer stops sending new clients before the listeners close.
    Without a service it is always ready: whoever can reach it is served.
    """

    def __init__(self, service: _Stoppable | None) -> None:
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
