"""
:class:`RedirectToHTTPS`: answer plain HTTP with a redirect to the same URL
over https, so one port can take both and send the plain clients across.
"""

from __future__ import annotations

import re

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from muxtwist._options import check_redirect, shown

__all__ = ["RedirectToHTTPS", "location"]

# A host name, an IPv4 address or a bracketed IPv6 address, then an optional
# port: anything else in Host is refused rather than echoed into Location.
_HOST = re.compile(rb"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}))(?::[0-9]{1,5})?$")
_SAFE_METHODS = (b"GET", b"HEAD")


_ABSOLUTE = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://")
_AFTER_AUTHORITY = re.compile(rb"[/?]")


def _path(uri: bytes) -> bytes | None:
    """
    The path and query of a request target, also of the absolute form;
    ``None`` for any other target (``*``, ``@evil.example/x``), which must
    never follow the host in a Location.
    """
    if uri.startswith(b"/"):
        return uri
    scheme = _ABSOLUTE.match(uri)
    if scheme is None:
        return None
    # Split by hand rather than with urlsplit, which decodes bytes as ASCII
    # and raises on anything else a client may send.
    rest = uri[scheme.end() :].split(b"#", 1)[0]
    cut = _AFTER_AUTHORITY.search(rest)
    tail = rest[cut.start() :] if cut is not None else b""
    return tail if tail.startswith(b"/") else b"/" + tail


def location(host: bytes | None, port: int | None, uri: bytes) -> bytes | None:
    """
    The https URL to redirect a request to: ``https://`` + ``host`` (a Host
    value; its port is replaced by ``port``, left out for ``None`` or 443) +
    the target's path and query. ``None`` when the host is not a plain host
    name or address, or the target is neither a path nor an absolute URI.
    """
    found = _HOST.match(host) if host is not None else None
    path = _path(uri)
    if found is None or path is None:
        return None
    name = found.group(1).lower()
    if port is not None and port != 443:
        name += b":%d" % port
    return b"https://" + name + path


class _Redirect(Resource):
    isLeaf = True

    def __init__(self, port: int | None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._port = port

    def render(self, request: Request) -> bytes:
        hosts = request.requestHeaders.getRawHeaders(b"host", [])
        # Several Host headers, or none in HTTP/1.1: RFC 9112 section 3.2
        # makes both a 400 (and servers disagree on which of several counts).
        raw = hosts[0] if len(hosts) == 1 else b"" if hosts or request.clientproto != b"HTTP/1.0" else None
        if raw is None:
            local = request.getHost()
            raw = getattr(local, "host", "").encode("ascii", "replace")
            if b":" in raw:
                raw = b"[" + raw + b"]"
        target = location(raw, self._port, request.uri)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if target is None:
            request.setResponseCode(400)
            return self._body(request, b"Bad Host header or request target\n")
        # 301 for reads; 308 keeps the method and body of anything else.
        request.setResponseCode(301 if request.method in _SAFE_METHODS else 308)
        request.setHeader(b"location", target)
        request.setHeader(b"cache-control", b"no-store")
        return self._body(request, b"Moved to " + target + b"\n")

    @staticmethod
    def _body(request: Request, body: bytes) -> bytes:
        """``body``, or for HEAD its length alone: a HEAD answer has no body (RFC 9110 section 9.3.2)."""
        if request.method == b"HEAD":
            request.setHeader(b"content-length", b"%d" % len(body))
            return b""
        return body


class RedirectToHTTPS(Site):
    """
    A factory that answers every plain HTTP request with a redirect to
    ``https://<Host without its port>[:port]<path and query>``: 301 for
    ``GET``/``HEAD``, 308 for other methods (``HEAD`` gets the headers
    without a body). A request whose Host is not a plain host name or
    address, that has several ``Host`` headers (or none in HTTP/1.1), or
    whose target is neither a path nor an absolute URI (``*``,
    ``@evil.example/x``), gets 400, never a Location built from it. Put it
    behind ``HTTP1()`` on the port that also terminates TLS::

        Rule(TLS(), TerminateTLS("certs/", site)),
        Rule(HTTP1(), RedirectToHTTPS()),

    :param port: the https port to name in the redirect; ``None`` or 443
        leaves it out (use this when the public https port is 443, even if
        this process listens elsewhere behind a NAT).
    """

    def __init__(self, port: int | None = None) -> None:
        check_redirect(port)
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be 1-65535, got {shown(port)}")
        super().__init__(_Redirect(port))  # type: ignore[no-untyped-call]
        self.port = port
        # An HTTP/1 answer only: this is never reached over TLS.
        self.noisy = False

    def __repr__(self) -> str:
        return f"RedirectToHTTPS(port={self.port!r})"
