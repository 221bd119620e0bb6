"""
TLS to backends: the client TLS options a ``tls=`` argument stands for.
"""

from __future__ import annotations

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import optionsForClientTLS

from muxtwist.proxy._backends import _host_of

__all__ = ["_tls_creator"]


def _tls_creator(tls: object, description: str) -> IOpenSSLClientConnectionCreator:
    if tls is True:
        host = _host_of(description)
        if host is None:
            raise ValueError(f"tls=True needs a host= in the backend description {description!r}; give tls='hostname'")
        return optionsForClientTLS(host)
    if isinstance(tls, str):
        return optionsForClientTLS(tls)
    if IOpenSSLClientConnectionCreator.providedBy(tls):
        return tls
    raise TypeError(f"tls must be True, a hostname or a client TLS options object, got {tls!r}")
