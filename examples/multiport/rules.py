"""
One process, several ports, each with its own rules.

The public port serves a web page and an echo service; the admin port only
takes HTTP from the loopback network, and closes anything else::

    twistd -n muxtwist --config examples/multiport/rules.py

The ports come from the environment so that the tests can pick free ones;
in your own file, write them out: ``"tcp:8080"``.
"""

import os

from twisted.internet.protocol import Factory
from twisted.web.server import Site
from twisted.web.static import Data

from muxtwist import Rule
from muxtwist.default import Echo
from muxtwist.matchers import HTTP1, AllOf, Any, RemoteAddress


class Page(Data):
    """A plain-text page served at every path (a ``Data`` alone only answers its own children)."""

    isLeaf = True

    def __init__(self, text: bytes) -> None:
        super().__init__(text, "text/plain")


PUBLIC = os.environ.get("PUBLIC_PORT", "3001")
ADMIN = os.environ.get("ADMIN_PORT", "3002")

public_site = Site(Page(b"public site\n"))
admin_site = Site(Page(b"admin console\n"))

listeners = {
    f"tcp:{PUBLIC}:interface=127.0.0.1": [
        Rule(HTTP1(), public_site, name="public-web"),
        Rule(Any(), Factory.forProtocol(Echo), name="echo"),
    ],
    f"tcp:{ADMIN}:interface=127.0.0.1": [
        Rule(AllOf(RemoteAddress("127.0.0.0/8", "::1"), HTTP1()), admin_site, name="admin-web"),
    ],
}

# Settings apply to every listener.
sniff_timeout = 2.0
shutdown_timeout = 5.0
