"""
The PROXY protocol matcher, registered as an IMatcherPlugin so that
``muxtwist.matchers.plugin("proxy_protocol")`` finds it.
"""

from muxtwist.matchers._plugins import MatcherPlugin
from muxtwist.matchers.proxy_protocol import ProxyProtocol

proxy_protocol = MatcherPlugin("proxy_protocol", ProxyProtocol, "a connection that starts with a PROXY v1/v2 header")
