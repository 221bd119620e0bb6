"""
Rules that use a matcher found by name through its plugin.

The directory holding ``twisted/plugins/acme_matchers_plugin.py`` must be on
``PYTHONPATH`` when the process starts, because Twisted collects plugin
directories when ``twisted.plugins`` is first imported::

    PYTHONPATH=examples/matcher_plugin twistd -n muxtwist --port 3000 \\
        --config examples/matcher_plugin/rules.py
    printf 'version\\r\\nquit\\r\\n' | nc 127.0.0.1 3000     # VERSION 1.6.0-acme
    curl http://127.0.0.1:3000/
"""

from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver
from twisted.web.server import Site
from twisted.web.static import Data

from muxtwist import Rule
from muxtwist.matchers import HTTP1, plugin


class Page(Data):
    """A plain-text page served at every path (a ``Data`` alone only answers its own children)."""

    isLeaf = True

    def __init__(self, text: bytes) -> None:
        super().__init__(text, "text/plain")


class TinyCache(LineOnlyReceiver):
    """A stand-in for memcached: answers ``version`` and misses every ``get``."""

    def lineReceived(self, line: bytes) -> None:
        command = line.split(b" ", 1)[0]
        if command == b"version":
            self.sendLine(b"VERSION 1.6.0-acme")
        elif command in (b"get", b"gets"):
            self.sendLine(b"END")
        elif command == b"quit":
            self.transport.loseConnection()
        else:
            self.sendLine(b"ERROR")


rules = [
    Rule(HTTP1(), Site(Page(b"web page\n")), name="web"),
    Rule(plugin("memcached"), Factory.forProtocol(TinyCache), name="cache"),
]
sniff_timeout = 2.0
