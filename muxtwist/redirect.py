"""
:class:`RedirectToHTTPS`: answer plain HTTP with a redirect to the same URL
over https, so one port can take both and send the plain clients across.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from muxtwist._options import check_redirect

__all__ = ["RedirectToHTTPS"]

# A host name, an IPv4 address or a bracketed IPv6 address, then an optional
# port: anything else in Host is refused rather than echoed into Location.
_HOST = re.compile(rb"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}))(?::[0-9]{1,5})?$")
_SAFE_METHODS = (b"GET", b"HEAD")


def _path(uri: bytes) -> bytes:
    """The path and query of a request target, also of the absolute form."""
    if uri.startswith(b"/"):
        return uri
    split = urlsplit(uri)
    path = split.path or b"/"
    return path + (b"?" + split.query if split.query else b"")


class _Redirect(Resource):
    isLeaf = True

    def __init__(self, port: int | None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._port = port

    def render(self, request: Request) -> bytes:
        raw = request.getHeader(b"host")
        if raw is None:
            local = request.getHost()
            raw = getattr(local, "host", "").encode("ascii", "replace")
            if b":" in raw:
                raw = b"[" + raw + b"]"
        found = _HOST.match(raw)
        if found is None:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"Bad Host header\n"
        host = found.group(1).lower()
        if self._port is not None and self._port != 443:
            host += b":%d" % self._port
        location = b"https://" + host + _path(request.uri)
        # 301 for reads; 308 keeps the method and body of anything else.
        request.setResponseCode(301 if request.method in _SAFE_METHODS else 308)
        request.setHeader(b"location", location)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return b"Moved to " + location + b"\n"


class RedirectToHTTPS(Site):
    """
    A factory that answers every plain HTTP request with a redirect to
    ``https://<Host without its port>[:port]<path and query>``: 301 for
    ``GET``/``HEAD``, 308 for other methods. Put it behind ``HTTP1()`` on the
    port that also terminates TLS::

        Rule(TLS(), TerminateTLS("certs/", site)),
        Rule(HTTP1(), RedirectToHTTPS()),

    :param port: the https port to name in the redirect; ``None`` or 443
        leaves it out (use this when the public https port is 443, even if
        this process listens elsewhere behind a NAT).
    """

    def __init__(self, port: int | None = None) -> None:
        check_redirect(port)
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be 1-65535, got {port!r}")
        super().__init__(_Redirect(port))  # type: ignore[no-untyped-call]
        self.port = port
        # An HTTP/1 answer only: this is never reached over TLS.
        self.noisy = False

    def __repr__(self) -> str:
        return f"RedirectToHTTPS(port={self.port!r})"
