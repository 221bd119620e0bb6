"""
muxtwist: many protocols on one port, the Twisted way.

A new connection is sniffed: its first bytes go to an ordered list of
:class:`Rule` s, and the first whose matcher says MATCH gets the connection,
every byte replayed, as an ordinary Twisted factory.
"""

from typing import TYPE_CHECKING

from muxtwist._lazy import lazy_attributes
from muxtwist._version import __version__
from muxtwist.interfaces import ConnectionInfo, IMatcher, IMatcherPlugin, Verdict

if TYPE_CHECKING:
    from muxtwist.service import MuxService
    from muxtwist.sniffing import Outcome, Rule, SniffingFactory

# Imported on first use: MuxService brings in twisted.application, and both
# bring in the sniffer, which a user of the matchers alone does not need.
_LAZY = {
    "MuxService": "muxtwist.service",
    "Outcome": "muxtwist.sniffing",
    "Rule": "muxtwist.sniffing",
    "SniffingFactory": "muxtwist.sniffing",
}

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

__getattr__, __dir__ = lazy_attributes(globals(), _LAZY)
