"""
HTTP and gRPC on one port, in one Twisted process: the cmux pattern.

``GRPC()`` recognises an HTTP/2 connection whose first request has
``content-type: application/grpc`` (it answers the client's SETTINGS itself,
because grpcio waits for the server's before sending its headers), and hands
it, every byte replayed, to an in-process gRPC handler. ``HTTP1()`` sends
everything else that looks like HTTP/1.x to a ``twisted.web`` site::

    twistd -n muxtwist --port 3000 --config examples/grpc_and_http/rules.py
    curl http://127.0.0.1:3000/
    python -c 'import grpc; print(grpc.insecure_channel("127.0.0.1:3000")
               .unary_unary("/demo.Greeter/Hello")(b"world"))'

The file's own directory is on ``sys.path`` while it loads, so the handler
lives beside it in ``greeter_grpc.py``.
"""

from greeter_grpc import greeter_factory
from twisted.web.server import Site
from twisted.web.static import Data

from muxtwist import Rule
from muxtwist.matchers import GRPC, HTTP1


class Page(Data):
    """A plain-text page served at every path."""

    isLeaf = True

    def __init__(self, text: bytes) -> None:
        super().__init__(text, "text/plain")


rules = [
    Rule(GRPC(), greeter_factory(), name="grpc"),
    Rule(HTTP1(), Site(Page(b"hello from HTTP\n")), name="web"),
]
