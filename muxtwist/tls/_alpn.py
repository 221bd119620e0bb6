"""
The ALPN protocols a :class:`~muxtwist.tls.TerminateTLS` offers when none are
given: what the rules it wraps can serve, read from their matchers' types
and their factories (an HTTP/2-capable ``twisted.web`` ``Site``), never from
names.
"""

from __future__ import annotations

from collections.abc import Iterator

from twisted.internet.interfaces import IProtocolFactory

from muxtwist import matchers
from muxtwist.interfaces import IMatcher

__all__ = ["offered_protocols"]


def offered_protocols(factory: IProtocolFactory) -> list[str]:
    """
    The ALPN protocols to offer for connections handed to ``factory``: the
    protocols that ``ALPN`` matchers of its rules ask for, ``h2`` when an
    HTTP/2-capable factory is reachable (a ``twisted.web`` ``Site`` with
    HTTP/2 support installed, or a rule whose matcher is an HTTP/2 or gRPC
    one), then ``http/1.1``.
    """
    wanted: list[str] = []
    h2 = _h2_capable(factory, wanted, depth=0)
    protocols = [p for p in wanted if p not in ("h2", "http/1.1")]
    if h2 or "h2" in wanted:
        protocols.insert(0, "h2")
    protocols.append("http/1.1")
    return protocols


def _site_speaks_h2(factory: object) -> bool:
    try:
        from twisted.web.http import H2_ENABLED
        from twisted.web.server import Site
    except ImportError:  # pragma: no cover - twisted.web is part of Twisted
        return False
    return bool(H2_ENABLED) and isinstance(factory, Site)


def _matchers(matcher: IMatcher) -> Iterator[IMatcher]:
    yield matcher
    for inner in getattr(matcher, "matchers", ()):
        yield from _matchers(inner)


def _h2_matcher(matcher: IMatcher) -> bool:
    """Whether ``matcher`` recognises HTTP/2 (by its type, never by its ``name`` label)."""
    return isinstance(matcher, (matchers.HTTP2, matchers.HTTP2Header, matchers.GRPC))


def _alpn_protocols(matcher: IMatcher) -> tuple[str, ...]:
    return matcher.protocols if isinstance(matcher, matchers.ALPN) else ()


def _h2_capable(factory: object, wanted: list[str], depth: int) -> bool:
    if depth > 8:
        return False
    if _site_speaks_h2(factory):
        return True
    inner = getattr(factory, "wrappedFactory", None)
    if inner is not None and _h2_capable(inner, wanted, depth + 1):
        return True
    capable = False
    for rule in getattr(factory, "rules", ()):
        for m in _matchers(rule.matcher):
            if _h2_matcher(m):
                capable = True
            for p in _alpn_protocols(m):
                if p not in wanted:
                    wanted.append(p)
        # A Site behind a rule that only matches HTTP/1 requests cannot be
        # reached by a client that negotiated h2, so it does not count.
        if _h2_capable(rule.factory, wanted, depth + 1) and not _http1_only(rule.matcher):
            capable = True
    return capable


def _http1_only(matcher: IMatcher) -> bool:
    found = list(_matchers(matcher))
    return any(isinstance(m, matchers.HTTP1) for m in found) and not any(
        _h2_matcher(m) or isinstance(m, (matchers.ALPN, matchers.Any, matchers.SNI)) for m in found
    )
