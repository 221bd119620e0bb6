"""
muxtwist: many protocols on one port, the Twisted way.

A new connection is sniffed: its first bytes go to an ordered list of
:class:`Rule` s, and the first whose matcher says MATCH gets the connection,
every byte replayed, as an ordinary Twisted factory.
"""

from muxtwist._version import __version__
from muxtwist.interfaces import ConnectionInfo, IMatcher, IMatcherPlugin, Verdict
from muxtwist.service import MuxService
from muxtwist.sniffing import Outcome, Rule, SniffingFactory

__all__ = [
    "ConnectionInfo",
    "IMatcher",
    "IMatcherPlugin",
    "MuxService",
    "Outcome",
    "Rule",
    "SniffingFactory",
    "Verdict",
    "__version__",
]
