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

import os
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.web.server import Site

from muxtwist._admin_merge import merge_metrics, merge_status
from muxtwist._admin_page import render_page
from muxtwist._admin_peers import WORKERS_DIR_ENV, WorkerPeers
from muxtwist._admin_resources import (
    Folder,
    LocalMetrics,
    LocalStatus,
    MetricsResource,
    ReadyResource,
    StaticFile,
    StatsPage,
    StatusResource,
)
from muxtwist._admin_site import MAX_CONNECTIONS, AdminSite
from muxtwist._admin_status import status, this_worker_slot
from muxtwist.metrics import Metrics, default_metrics

__all__ = [
    "WORKERS_DIR_ENV",
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

for _public in (
    MetricsResource,
    ReadyResource,
    StatsPage,
    StatusResource,
    WorkerPeers,
    merge_metrics,
    merge_status,
    render_page,
    status,
):
    # Documented where users import them from.
    _public.__module__ = __name__
del _public


def admin_site(
    service: Any | None = None,
    registry: CollectorRegistry | Metrics | None = None,
    *,
    peers: WorkerPeers | None = None,
    reactor: Any = None,
    max_connections: int = MAX_CONNECTIONS,
) -> Site:
    """
    A ``Site`` serving the stats page at ``/``, ``/status.json``,
    ``/metrics`` and ``/ready``.

    :param service: the :class:`~muxtwist.service.MuxService` whose listeners
        the page shows and whose draining ``/ready`` reports.
    :param registry: the registry (or :class:`~muxtwist.metrics.Metrics`) to
        expose, and whose tracked factories the page shows without a
        ``service``; by default the service's metrics, or else
        :func:`~muxtwist.metrics.default_metrics`, which every ``MuxService``
        built without metrics reads and counts into (``twistd muxtwist``'s).
    :param peers: the workers to ask and sum; by default, the workers of the
        ``--workers`` pool this process is a worker of (``MUXTWIST_WORKER``
        and ``MUXTWIST_WORKERS_DIR`` set), if any.
    :param max_connections: the most connections the site holds open at
        once; a new one is closed at once while it holds that many, so
        clients holding connections (idle, or sending a byte at a time)
        cannot use up this process's file descriptors.
    """
    if registry is None:
        registry = getattr(service, "metrics", None) or default_metrics()
    metrics = registry if isinstance(registry, Metrics) else default_metrics()
    raw = registry.registry if isinstance(registry, Metrics) else registry
    if peers is None and os.environ.get(WORKERS_DIR_ENV) and this_worker_slot() is not None:
        # Only in a worker (the parent names both): a process that merely
        # inherited the directory (started from a worker, or from a shell
        # that exported it) serves its own numbers, not another pool's.
        peers = WorkerPeers(os.environ[WORKERS_DIR_ENV], reactor)
    root = Folder()
    root.putChild(b"", StatsPage(service, metrics, peers, reactor))
    root.putChild(b"status.json", StatusResource(service, metrics, peers, reactor))
    root.putChild(b"metrics", MetricsResource(registry, peers, reactor))
    root.putChild(b"ready", ReadyResource(service))
    root.putChild(b"stats.css", StaticFile("stats.css", b"text/css; charset=utf-8"))
    root.putChild(b"stats.js", StaticFile("stats.js", b"text/javascript; charset=utf-8"))
    worker = Folder()
    worker.putChild(b"metrics", LocalMetrics(raw))
    worker.putChild(b"status.json", LocalStatus(service, metrics))
    root.putChild(b"worker", worker)
    site = AdminSite(root, max_connections=max_connections, reactor=reactor)
    site.displayTracebacks = False
    site.noisy = False
    return site
