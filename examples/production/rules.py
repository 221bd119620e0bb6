"""
Rules for running in production: behind a load balancer that sends PROXY
protocol headers, started by systemd socket activation, with several worker
processes. Nothing in the rules changes for any of these; what changes is
how twistd is started (see ``docs/howto/production.rst``)::

    # behind HAProxy (send-proxy-v2) on 127.0.0.1
    twistd -n muxtwist --port 3000 --config examples/production/rules.py
    # from a systemd socket unit (examples/production/muxtwist.socket)
    twistd -n muxtwist --port systemd:domain=INET:name=muxtwist --config ...
    # four processes sharing the port
    twistd -n muxtwist --port 3000 --workers 4 --config ...

``accept_proxy_protocol`` names the load balancers' addresses (here taken
from ``TRUSTED_PROXIES``, default loopback): their connections must start
with a PROXY header, and everything after it (``RemoteAddress``, the
connection log's ``peer``, limits per source) sees the client the header
names, not the load balancer. The pages say which process answered, so you
can watch the workers share the work.
"""

import os

from twisted.internet.protocol import Factory
from twisted.web.server import Site
from twisted.web.static import Data

from muxtwist import Rule
from muxtwist.default import Echo
from muxtwist.matchers import HTTP1, AllOf, Prefix, RemoteAddress


class Page(Data):
    """A plain-text page served at every path."""

    isLeaf = True

    def __init__(self, text: str) -> None:
        super().__init__(text.encode(), "text/plain")


pid = os.getpid()

rules = [
    # The office network (127.0.0.2 stands in for it in the tests) gets its own page:
    # the address is the client's, read from the PROXY header.
    Rule(AllOf(HTTP1(), RemoteAddress("127.0.0.2/32")), Site(Page(f"hello, office; process {pid}\n")), name="office"),
    Rule(HTTP1(), Site(Page(f"hello, world; process {pid}\n")), name="web"),
    Rule(Prefix(b"ECHO "), Factory.forProtocol(Echo), name="echo"),
]

accept_proxy_protocol = os.environ.get("TRUSTED_PROXIES", "127.0.0.1/32").split(",")
max_connections_per_source = 100
