"""
The inner factories of a :class:`~muxtwist.SniffingFactory`: the rule sets
connections are sniffed under, and which of their factories run. Each inner
factory gets ``doStart`` once while the sniffing factory runs and wants it,
and ``doStop`` once nothing can use it any more (DESIGN.md, "Sniffing
semantics", 6).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger

from muxtwist._rules import Rule
from muxtwist.interfaces import IRetiringFactory

__all__ = ["InnerFactories", "RuleSet", "tell_retiring", "unique"]

log = Logger(namespace="muxtwist.sniffing")


def unique(factories: Iterable[IProtocolFactory | None]) -> list[IProtocolFactory]:
    """``factories`` without ``None`` and without repeats, in order."""
    seen: dict[int, IProtocolFactory] = {}
    for f in factories:
        if f is not None:
            seen.setdefault(id(f), f)
    return list(seen.values())


@attrs.define(eq=False)
class RuleSet:
    """
    What one ``set_rules`` call installed, kept by every connection sniffed
    under it, and how many of those are still sniffing (so may yet pick any
    of its factories).
    """

    rules: tuple[Rule, ...]
    on_timeout: IProtocolFactory | None
    on_no_match: IProtocolFactory | None
    factories: tuple[IProtocolFactory, ...]
    sniffing: int = 0
    #: whether zero bytes can only make the rules wait (``muxtwist._rules.waits_for_bytes``).
    waits: bool = False
    #: whether every connection is handed to a relay (:mod:`muxtwist.proxy._polled`).
    relays_only: bool = False
    #: whether the owner was told it is retiring while connections sniffed
    #: under these rules: each is handed on late, and its winner told again.
    retired: bool = False


class InnerFactories:
    """
    Inner factories: those started, those of them no longer wanted (stopped
    once nothing can use them), and live handed-off connections per
    factory; all keyed by id().
    """

    def __init__(self) -> None:
        self.running: dict[int, IProtocolFactory] = {}
        self.retiring: dict[int, IProtocolFactory] = {}
        self.in_use: dict[int, int] = {}
        # Running factories told they are retiring because their owner was
        # (tell_running): its doStop does not tell them a second time.
        self.told: set[int] = set()

    def start(self, wanted: Iterable[IProtocolFactory]) -> None:
        """Start the wanted factories not running yet; mark the others retiring."""
        wanted = tuple(wanted)
        for f in wanted:
            if id(f) not in self.running:
                self.running[id(f)] = f
                self.told.discard(id(f))
                f.doStart()
            self.retiring.pop(id(f), None)
        wanted_ids = {id(f) for f in wanted}
        # A copy: a factory told it is retiring may end connections, and so stop others.
        for key, f in list(self.running.items()):
            if key not in wanted_ids and key not in self.retiring:
                self.retiring[key] = f
                tell_retiring(f)

    def retire_all(self) -> None:
        """
        Every running factory is no longer wanted (the last port stopped);
        each is told so, unless :meth:`tell_running` told it already.
        """
        told, self.told = self.told, set()
        for key, f in list(self.running.items()):
            if key not in self.retiring:
                self.retiring[key] = f
                if key not in told:
                    tell_retiring(f)

    def tell_running(self) -> None:
        """
        The owner itself is retiring (the rules of the sniffer it is nested
        in no longer name it): tell each running factory not retiring yet,
        once. They keep running: the owner serves on until its own doStop.
        """
        for key, f in list(self.running.items()):
            if key not in self.retiring:
                self.told.add(key)
                tell_retiring(f)

    def stop_unused(self, sniffing: Iterable[RuleSet]) -> None:
        """
        Stop each retiring factory that nothing can use any more: no live
        connection was handed to it, and none of the ``sniffing`` rule sets
        (those with connections still sniffing) names it.
        """
        busy = {id(f) for s in sniffing for f in s.factories}
        for key, f in list(self.retiring.items()):
            if key not in busy and not self.in_use.get(key):
                del self.retiring[key]
                del self.running[key]
                self.told.discard(key)
                f.doStop()

    def use(self, f: IProtocolFactory) -> None:
        """A connection was handed to ``f``."""
        self.in_use[id(f)] = self.in_use.get(id(f), 0) + 1

    def release(self, f: IProtocolFactory) -> bool:
        """A connection handed to ``f`` ended; whether that may let a retiring factory stop."""
        n = self.in_use.pop(id(f), 0) - 1
        if n > 0:
            self.in_use[id(f)] = n
            return False
        return bool(self.retiring)


def tell_retiring(f: IProtocolFactory) -> None:
    """Tell an :class:`~muxtwist.interfaces.IRetiringFactory` that the rules no longer name it."""
    if not IRetiringFactory.providedBy(f):
        return
    try:
        f.retiring()
    except Exception:
        log.failure("{factory!r} raised when told it is retiring; ignored", factory=f)
