"""
The admin site: ``/metrics`` (Prometheus text exposition) and ``/ready``
(readiness for load balancers and orchestrators).

It is an ordinary ``Site``, so it can be a rule of its own listener::

    Rule(HTTP1(path="/metrics"), admin_site())

or served on a separate endpoint with ``twistd muxtwist --admin tcp:9100``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from muxtwist.metrics import Metrics, default_metrics

if TYPE_CHECKING:
    from muxtwist.service import MuxService

__all__ = ["MetricsResource", "ReadyResource", "admin_site"]


class MetricsResource(Resource):
    """The registry's samples in the Prometheus text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)


class ReadyResource(Resource):
    """
    200 while the service serves, 503 once it is draining (or stopped), so a
    load balancer stops sending new clients before the listeners close.
    Without a service it is always ready: whoever can reach it is served.
    """

    isLeaf = True

    def __init__(self, service: MuxService | None) -> None:
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


def admin_site(service: MuxService | None = None, registry: CollectorRegistry | Metrics | None = None) -> Site:
    """
    A ``Site`` serving ``/metrics`` and ``/ready``.

    :param service: the :class:`~muxtwist.service.MuxService` whose draining
        ``/ready`` reports.
    :param registry: the registry (or :class:`~muxtwist.metrics.Metrics`) to
        expose; the process-wide one by default.
    """
    if registry is None:
        registry = default_metrics()
    if isinstance(registry, Metrics):
        registry = registry.registry
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    root.putChild(b"ready", ReadyResource(service))
    site = Site(root)
    site.displayTracebacks = False
    site.noisy = False
    return site
