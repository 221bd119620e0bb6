"""
Matchers: pure functions from the first bytes of a connection to a verdict.

Every built-in matcher is also an :class:`~muxtwist.interfaces.IMatcherPlugin`
registered in ``twisted/plugins/muxtwist_matchers.py``; :func:`plugin` builds
any installed matcher, built-in or third-party, by name.
"""

from muxtwist.matchers._basic import AllOf, Any, AnyOf, Not, Prefix, Regex, RemoteAddress
from muxtwist.matchers._plugins import MatcherPlugin, plugin, plugins
from muxtwist.matchers.http import HTTP1
from muxtwist.matchers.info import ALPN, SNI

__all__ = [
    "ALPN",
    "HTTP1",
    "SNI",
    "AllOf",
    "Any",
    "AnyOf",
    "MatcherPlugin",
    "Not",
    "Prefix",
    "Regex",
    "RemoteAddress",
    "plugin",
    "plugins",
]
