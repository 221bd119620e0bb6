"""
A server-speaks-first protocol behind ``on_timeout``, next to HTTP.

SMTP, MySQL and FTP clients connect and wait for the server to speak. They
send nothing, so no matcher can recognise them; when ``sniff_timeout``
passes without a single byte, the connection goes to ``on_timeout``. Here
that is a toy SMTP-like greeter; HTTP clients, who speak first, get a web
page at once::

    twistd -n muxtwist --port 3000 --config examples/greeter/rules.py
    curl http://127.0.0.1:3000/
    nc 127.0.0.1 3000          # wait half a second: "220 ..."; type QUIT

A silent client waits ``sniff_timeout`` for its greeting, so keep it short:
long enough for clients that speak first to send their first bytes.
"""

from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver
from twisted.web.server import Site
from twisted.web.static import Data

from muxtwist import Rule
from muxtwist.matchers import HTTP1


class Page(Data):
    """A plain-text page served at every path (a ``Data`` alone only answers its own children)."""

    isLeaf = True

    def __init__(self, text: bytes) -> None:
        super().__init__(text, "text/plain")


class Greeter(LineOnlyReceiver):
    """Just enough of SMTP to show who speaks first: a greeting, HELO/EHLO, NOOP and QUIT."""

    def connectionMade(self) -> None:
        self.sendLine(b"220 mail.example.test ESMTP muxtwist example")

    def lineReceived(self, line: bytes) -> None:
        command = line.split(b" ", 1)[0].upper()
        if command in (b"HELO", b"EHLO"):
            self.sendLine(b"250 mail.example.test")
        elif command == b"NOOP":
            self.sendLine(b"250 OK")
        elif command == b"QUIT":
            self.sendLine(b"221 Bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"502 Command not implemented")


rules = [
    Rule(HTTP1(), Site(Page(b"web page\n")), name="web"),
]
on_timeout = Factory.forProtocol(Greeter)
sniff_timeout = 0.5
