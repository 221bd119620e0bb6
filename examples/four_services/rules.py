"""
Four services on one port: two web sites told apart by Host, an echo
service for clients that start with ``ECHO``, and a greeter for clients that
wait for the server to speak first::

    twistd -n muxtwist --port 3000 --config examples/four_services/rules.py
    curl -H 'Host: a.test' http://127.0.0.1:3000/     # this is a.test
    curl http://127.0.0.1:3000/                       # some other host
    echo 'ECHO hi' | nc -N 127.0.0.1 3000             # ECHO hi
    nc 127.0.0.1 3000                                 # after 0.5 s: 220 ...
"""

from twisted.internet.protocol import Factory, Protocol
from twisted.web.server import Site
from twisted.web.static import Data

from muxtwist import Rule
from muxtwist.default import Echo
from muxtwist.matchers import HTTP1, Prefix


class Page(Data):
    """A plain-text page served at every path (a ``Data`` alone only answers its own children)."""

    isLeaf = True

    def __init__(self, text: bytes) -> None:
        super().__init__(text, "text/plain")


class Greeting(Protocol):
    """Speaks first, like an SMTP or MySQL server, then echoes."""

    def connectionMade(self) -> None:
        self.transport.write(b"220 hello, silent client\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


rules = [
    # Order is priority: the a.test rule must come before the catch-all HTTP rule.
    Rule(HTTP1(host="a.test"), Site(Page(b"this is a.test\n")), name="a-site"),
    Rule(HTTP1(), Site(Page(b"some other host\n")), name="other-site"),
    Rule(Prefix(b"ECHO"), Factory.forProtocol(Echo), name="echo"),
]
on_timeout = Factory.forProtocol(Greeting)
sniff_timeout = 0.5
