"""
Two protocols on one port, embedded in your own Twisted program: HTTP gets a
web page, anything else an echo service.

Run it, then try ``curl`` and ``nc`` against the same port::

    python examples/two_protocols.py                  # 127.0.0.1:3000
    python examples/two_protocols.py tcp:4000         # any endpoint description
    curl http://127.0.0.1:3000/
    echo hello | nc -N 127.0.0.1 3000
"""

from __future__ import annotations

import sys

from twisted.internet import endpoints, reactor
from twisted.internet.protocol import Factory
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web.server import Site
from twisted.web.static import Data

from muxtwist import Rule, SniffingFactory
from muxtwist.default import Echo
from muxtwist.matchers import HTTP1, Any


class Page(Data):
    """A plain-text page served at every path (a ``Data`` alone only answers its own children)."""

    isLeaf = True

    def __init__(self, text: bytes) -> None:
        super().__init__(text, "text/plain")


rules = [
    Rule(HTTP1(), Site(Page(b"hello from HTTP\n")), name="web"),
    Rule(Any(), Factory.forProtocol(Echo), name="echo"),
]


def main(argv: list[str]) -> None:
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    description = argv[1] if len(argv) > 1 else "tcp:3000:interface=127.0.0.1"
    endpoints.serverFromString(reactor, description).listen(SniffingFactory(rules, sniff_timeout=2.0))
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv)
