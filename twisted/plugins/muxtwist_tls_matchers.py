"""
The matchers on what TLS termination learnt of a connection, registered as
IMatcherPlugins: ``sni`` (the server name) and ``alpn`` (the negotiated
protocol).
"""

from typing import Any

from muxtwist.matchers._plugins import MatcherPlugin
from muxtwist.matchers.info import ALPN, SNI


def _sni(patterns: Any = (), **options: Any) -> SNI:
    return SNI(*([patterns] if isinstance(patterns, str) else patterns), **options)


def _alpn(protocols: Any = (), **options: Any) -> ALPN:
    return ALPN(*([protocols] if isinstance(protocols, str) else protocols), **options)


sni = MatcherPlugin("sni", _sni, "the TLS server name, inside TLS termination (names or globs)")
alpn = MatcherPlugin("alpn", _alpn, "the negotiated ALPN protocol, inside TLS termination")
