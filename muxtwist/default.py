"""
The built-in rules that serve when no rules file is given: HTTP gets a small
status page, anything else an echo service, so two protocols share the port
out of the box.
"""

from __future__ import annotations

import html
import json
import typing

from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from muxtwist.matchers import HTTP1, Any
from muxtwist.metrics import LIMITS
from muxtwist.service import MuxService
from muxtwist.sniffing import Rule

__all__ = ["Echo", "StatusPage", "default_rules", "status"]


@implementer(IHalfCloseableProtocol, IPushProducer)
class Echo(Protocol):
    """
    Send back whatever arrives; when the client is done sending, finish and close.

    A client that writes without reading must not make the server hold what
    it cannot send: Echo is the streaming producer of its own transport, so
    when the transport's write buffer fills up it pauses reading from the
    client (the rest waits in the kernel and the client's sends block), and
    reads again once the buffer has drained.
    """

    def connectionMade(self) -> None:
        transport: typing.Any = self.transport
        transport.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        transport: typing.Any = self.transport
        transport.unregisterProducer()
        transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    # IPushProducer: what we write is what the client sent, so our output
    # is throttled by throttling our input.

    def pauseProducing(self) -> None:
        transport: typing.Any = self.transport
        transport.pauseProducing()

    def resumeProducing(self) -> None:
        transport: typing.Any = self.transport
        if transport.connected and not transport.disconnecting:
            transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


def status(service: MuxService) -> dict[str, object]:
    """
    The numbers the status page shows: each listener's rules with live and
    total connections, and the same process-wide counters ``/metrics`` exports.
    """
    listeners = []
    for _, listener in sorted(service.listeners.items()):
        factory = listener.factory
        names = [r.name for r in factory.rules] + ["on_timeout", "on_no_match"]
        # The port number only: a stranger may reach this page, so no
        # interface, path, PID or version is shown (the admin site has those).
        host = listener.port.getHost() if listener.port is not None else None
        listeners.append(
            {
                "endpoint": f"port {getattr(host, 'port', '')}" if hasattr(host, "port") else "listener",
                "sniffing": sum(1 for c in factory.connections if c.sniffing),
                "rules": [
                    {"name": n, "active": factory.stats[n].active, "total": factory.stats[n].total} for n in names
                ],
            }
        )
    metrics = service.metrics
    outcomes = metrics.connections_by_outcome()
    limits = {limit: metrics.value("muxtwist_limit_rejections_total", limit=limit) for limit in LIMITS}
    return {
        "listeners": listeners,
        "connections_by_outcome": outcomes,
        "limit_rejections": limits,
    }


class StatusPage(Resource):
    """``/`` in HTML, ``/status.json`` for machines."""

    isLeaf = True

    def __init__(self, service: MuxService) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.service = service

    def render(self, request: Request) -> bytes:
        # Before any method's rendering, so that error answers (405 to a
        # POST, 501 to an unknown method) do not name Twisted's version either.
        request.setHeader(b"server", b"muxtwist")
        body: bytes = super().render(request)  # type: ignore[no-untyped-call]
        return body

    def render_GET(self, request: Request) -> bytes:
        data = status(self.service)
        if request.path.endswith(b".json"):
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(data, indent=2).encode() + b"\n"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        rows = []
        for listener in data["listeners"]:  # type: ignore[attr-defined]
            rows.append(f"<h2>{html.escape(listener['endpoint'])}</h2><p>sniffing now: {listener['sniffing']}</p>")
            rows.append("<table><tr><th>rule</th><th>live</th><th>total</th></tr>")
            for r in listener["rules"]:
                rows.append(f"<tr><td>{html.escape(r['name'])}</td><td>{r['active']}</td><td>{r['total']}</td></tr>")
            rows.append("</table>")
        rows.append("<h2>ended connections by outcome</h2><table>")
        for outcome, n in sorted(data["connections_by_outcome"].items()):  # type: ignore[attr-defined]
            rows.append(f"<tr><td>{html.escape(outcome)}</td><td>{n:g}</td></tr>")
        rows.append("</table><h2>refused by limits</h2><table>")
        for limit, n in data["limit_rejections"].items():  # type: ignore[attr-defined]
            rows.append(f"<tr><td>{html.escape(limit)}</td><td>{n:g}</td></tr>")
        rows.append("</table>")
        body = (
            "<!doctype html><html><head><title>muxtwist</title></head><body>"
            "<h1>muxtwist</h1>"
            "<p>HTTP reaches this page; any other protocol on this port reaches an echo service "
            "(try <code>nc</code>).</p>" + "".join(rows) + "</body></html>\n"
        )
        return body.encode()

    render_HEAD = render_GET


def default_rules(service: MuxService) -> list[Rule]:
    """The built-in rules: HTTP to the status page of ``service``, anything else to echo."""
    return [
        Rule(HTTP1(), Site(StatusPage(service)), name="status-page"),
        Rule(Any(), Factory.forProtocol(Echo), name="echo"),
    ]
