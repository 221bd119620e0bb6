"""
Several servers supervised together, stopped gracefully on SIGTERM.

A ``MultiService`` (what ``twistd`` gives you as the ``Application``) holds a
:class:`~muxtwist.MuxService` for the shared public port and, beside it, a
plain admin web server on a port of its own. On SIGTERM every child stops:
the mux stops accepting, aborts connections still being sniffed, lets
handed-off ones finish for up to ``shutdown_timeout`` seconds, aborts the
rest, and only then does the process exit::

    python examples/supervised.py                       # public 3000, admin 3001
    python examples/supervised.py tcp:0 tcp:0           # any endpoint descriptions
    curl http://127.0.0.1:3000/slow &                   # takes a second...
    kill -TERM <pid>                                    # ...and still completes
"""

from __future__ import annotations

import sys

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.static import Data

from muxtwist import MuxService, Rule, SniffingFactory
from muxtwist.default import Echo
from muxtwist.matchers import HTTP1, Any

log = Logger()


class Page(Data):
    """A plain-text page served at every path (a ``Data`` alone only answers its own children)."""

    isLeaf = True

    def __init__(self, text: bytes) -> None:
        super().__init__(text, "text/plain")


class Slow(Resource):
    """A response that takes ``delay`` seconds, to watch a stop wait for it."""

    isLeaf = True

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def render_GET(self, request: Request) -> object:
        log.info("slow request started")
        request.write(b"slow response begins...\n")

        def finish() -> None:
            request.write(b"...and ends\n")
            request.finish()

        call = reactor.callLater(self.delay, finish)  # type: ignore[attr-defined]
        request.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)
        return NOT_DONE_YET


def make_services(public: str, admin: str) -> MultiService:
    """The whole application: the mux on ``public``, an admin site on ``admin``."""
    top = MultiService()

    root = Resource()
    root.putChild(b"", Data(b"public site\n", "text/plain"))
    root.putChild(b"slow", Slow(delay=1.0))
    mux = MuxService(shutdown_timeout=3.0)
    mux.add_listener(
        public,
        SniffingFactory(
            [
                Rule(HTTP1(), Site(root), name="web"),
                Rule(Any(), Factory.forProtocol(Echo), name="echo"),
            ],
            sniff_timeout=2.0,
        ),
    )
    mux.setServiceParent(top)

    admin_site = Site(Page(b"admin console\n"))
    strports.service(admin, admin_site).setServiceParent(top)
    return top


def main(argv: list[str]) -> None:
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    public = argv[1] if len(argv) > 1 else "tcp:3000:interface=127.0.0.1"
    admin = argv[2] if len(argv) > 2 else "tcp:3001:interface=127.0.0.1"
    top = make_services(public, admin)
    top.startService()
    # The reactor waits for the Deferred stopService returns, so the drain
    # finishes before the process exits.
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    log.info("all services stopped")


if __name__ == "__main__":
    main(sys.argv)
