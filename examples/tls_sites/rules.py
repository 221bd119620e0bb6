"""
Two https sites with their own certificates, HTTP/2 and HTTP/1.1, and plain
HTTP redirected to https, all on one port.

``CERT_DIR`` holds one PEM file (certificate chain and key) per host name:
``a.test.pem`` and ``b.test.pem`` here (``_.example.com.pem`` would serve
``*.example.com``, ``DEFAULT.pem`` clients without a known name).
``PUBLIC_PORT`` is the port clients use, for the redirects (leave it unset
for 443)::

    CERT_DIR=/etc/muxtwist/certs PUBLIC_PORT=8443 \\
        twistd -n muxtwist --port 8443 --config examples/tls_sites/rules.py
    curl --http2 --resolve a.test:8443:127.0.0.1 --cacert ca.pem https://a.test:8443/
    curl -i --resolve a.test:8443:127.0.0.1 http://a.test:8443/x   # 301 to https

``TerminateTLS`` picks the certificate from the name the client asks for and
offers ``h2`` and ``http/1.1`` by ALPN, because the sites behind it are
``twisted.web`` sites and Twisted's HTTP/2 support is installed. The rules
inside see that name (``SNI``) and route on it. ``kill -HUP`` re-reads the
certificates.
"""

import os

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from muxtwist import Rule, SniffingFactory
from muxtwist.actions import RedirectToHTTPS, TerminateTLS
from muxtwist.matchers import HTTP1, SNI, TLS


class Hello(Resource):
    """Says which site answered and over which HTTP version."""

    isLeaf = True

    def __init__(self, site: str) -> None:
        super().__init__()
        self.site = site

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return f"{self.site} over {request.clientproto.decode()}\n".encode()


sites = SniffingFactory(
    [
        Rule(SNI("a.test"), Site(Hello("a.test")), name="a.test"),
        Rule(SNI("b.test"), Site(Hello("b.test")), name="b.test"),
    ]
)

public_port = os.environ.get("PUBLIC_PORT")

rules = [
    Rule(TLS(sni=["a.test", "b.test"]), TerminateTLS(os.environ["CERT_DIR"], sites), name="https"),
    Rule(HTTP1(), RedirectToHTTPS(port=int(public_port) if public_port else None), name="redirect"),
]
