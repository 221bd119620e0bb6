"""
What the in-process HTTP targets (``WSGI``, ``ASGI``) share about slow
request heads: how long one may take once the target is asked to finish,
and the answer to one that took longer than ``header_timeout``.
"""

from __future__ import annotations

__all__ = ["PARTIAL_REQUEST_GRACE", "REQUEST_TIMEOUT_RESPONSE"]

#: seconds without a byte after which a request whose headers are still
#: coming is given up once its target was asked to finish (a reload, a
#: stop): the protocols have no timer of their own then.
PARTIAL_REQUEST_GRACE = 10.0

#: What a client whose request's head did not come in full within
#: ``header_timeout`` seconds of its first byte gets, before the close.
REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 16\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"Request Timeout\n"
)
