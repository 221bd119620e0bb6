"""
The built-in matchers, registered as IMatcherPlugins so that
``muxtwist.matchers.plugin(name, **options)`` finds them the same way it
finds third-party ones.
"""

from muxtwist import matchers as _m
from muxtwist.matchers._plugins import MatcherPlugin

any_ = MatcherPlugin("any", _m.Any, "any connection that sends a byte")
prefix = MatcherPlugin("prefix", lambda prefixes, **kw: _m.Prefix(*prefixes, **kw), "fixed byte prefixes")
regex = MatcherPlugin("regex", _m.Regex, "a regular expression over the first bytes")
remote_address = MatcherPlugin(
    "remote_address", lambda networks, **kw: _m.RemoteAddress(*networks, **kw), "the client's network"
)
http1 = MatcherPlugin("http1", _m.HTTP1, "an HTTP/1.x request, by method, host, path and headers")
