"""
One port number, both transports: HTTPS, SSH and HTTP on N/tcp; HTTP/3 for
two sites (by SNI), DNS and WireGuard on N/udp::

    CERT_DIR=certs H3_A=127.0.0.1:4431 H3_B=127.0.0.1:4432 \\
    SSH_BACKEND=127.0.0.1:22 WIREGUARD=127.0.0.1:51820 PORT=8443 \\
        twistd -n muxtwist --config examples/udp/rules.py
    curl --cacert ca.pem --resolve a.test:8443:127.0.0.1 https://a.test:8443/
    python examples/udp/h3.py get https://a.test/ --connect 127.0.0.1:8443 --ca ca.pem
    dig @127.0.0.1 -p 8443 a.test

``CERT_DIR`` holds ``<host>.pem`` files (certificate chain and key) for
TerminateTLS; the HTTP/3 servers (``h3.py serve``) hold their own
certificates, since QUIC is proxied, not terminated. DNS is answered
in-process by ``twisted.names`` from the ``hosts`` file next to this one.
"""

import os

from twisted.names import dns, hosts, server
from twisted.web.server import Site
from twisted.web.static import Data

from muxtwist import Rule
from muxtwist.actions import Proxy, TerminateTLS, UDPProxy
from muxtwist.matchers import DNS, HTTP1, QUIC, SSH, TLS, WireGuard

HERE = os.path.dirname(os.path.abspath(__file__))
PORT = os.environ.get("PORT", "8443")


class Page(Data):
    """A plain-text page at every path."""

    isLeaf = True

    def __init__(self, text: bytes) -> None:
        super().__init__(text, "text/plain")


def udp_backend(variable: str, default: str) -> str:
    host, _, port = os.environ.get(variable, default).rpartition(":")
    return f"udp:host={host}:port={port}"


def tcp_backend(variable: str, default: str) -> str:
    host, _, port = os.environ.get(variable, default).rpartition(":")
    return f"tcp:host={host}:port={port}"


names = dns.DNSDatagramProtocol(server.DNSServerFactory(clients=[hosts.Resolver(file=os.path.join(HERE, "hosts"))]))

listeners = {
    f"tcp:{PORT}": [
        Rule(TLS(), TerminateTLS(os.environ.get("CERT_DIR", "certs"), Site(Page(b"https over tcp\n"))), name="https"),
        Rule(SSH(), Proxy(tcp_backend("SSH_BACKEND", "127.0.0.1:22")), name="ssh"),
        Rule(HTTP1(), Site(Page(b"plain http\n")), name="http"),
    ],
    f"udp:{PORT}": [
        Rule(QUIC(sni="a.test", alpn="h3"), UDPProxy(udp_backend("H3_A", "127.0.0.1:4431")), name="h3-a"),
        Rule(QUIC(sni="b.test", alpn="h3"), UDPProxy(udp_backend("H3_B", "127.0.0.1:4432")), name="h3-b"),
        Rule(DNS(), names, name="dns"),
        Rule(WireGuard(), UDPProxy(udp_backend("WIREGUARD", "127.0.0.1:51820"), idle_timeout=180.0), name="wireguard"),
    ],
}
sniff_timeout = 2.0
max_udp_flows = 20000
max_flows_per_source = 64
