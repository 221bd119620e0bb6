"""
Matcher plugins: a named builder per matcher, found through ``twisted.plugin``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any as AnyType

import attrs
from zope.interface import implementer

from muxtwist._options import shown
from muxtwist.interfaces import IMatcher, IMatcherPlugin

__all__ = ["MatcherPlugin", "plugin", "plugins"]


@implementer(IMatcherPlugin)
@attrs.frozen
class MatcherPlugin:
    """
    An :class:`IMatcherPlugin` that builds matchers by calling ``factory``.

    Put one at module level in a ``twisted/plugins/`` module to ship a matcher::

        my_matcher = MatcherPlugin("memcached", Memcached, "memcached text protocol")
    """

    name: str
    factory: Callable[..., IMatcher]
    description: str = ""

    def build(self, **options: AnyType) -> IMatcher:
        return self.factory(**options)


def plugins() -> dict[str, IMatcherPlugin]:
    """Every installed matcher plugin, by name (the first one found wins a clash)."""
    from twisted.plugin import getPlugins

    found: dict[str, IMatcherPlugin] = {}
    for p in getPlugins(IMatcherPlugin):
        found.setdefault(p.name, p)
    return found


def plugin(name: str, /, **options: AnyType) -> IMatcher:
    """
    Build the matcher registered under ``name`` with ``options``.

    :raises LookupError: no installed plugin has that name (the message lists
        the names there are).
    """
    available = plugins()
    try:
        chosen = available[name]
    except KeyError:
        raise LookupError(f"no matcher plugin named {shown(name)}; installed: {', '.join(sorted(available))}") from None
    matcher: IMatcher = chosen.build(**options)
    return matcher
