"""
The tutorial's rules file: the same two services as ``two_protocols.py``,
run by twistd instead of your own script::

    twistd -n muxtwist --port 3000 --config examples/rules.py
"""

from twisted.internet.protocol import Factory
from twisted.web.server import Site
from twisted.web.static import Data

from muxtwist import Rule
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
sniff_timeout = 2.0
