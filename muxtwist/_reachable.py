"""
What a factory's rules reach: each rule's factory, what it wraps
(``TerminateTLS``'s ``factory``, a ``WrappingFactory``'s ``wrappedFactory``)
and, through nested sniffing factories, their rules in turn. The metrics read
the proxies and sniffers found this way; a ``MuxService`` reloads the
certificates of the ``TerminateTLS`` found this way.

Light: no metrics, no TLS, no reactor; duck typing only (``rules``,
``factory``, ``wrappedFactory``) and :class:`~muxtwist.interfaces.IBackendPool`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from muxtwist.interfaces import IBackendPool

__all__ = ["MAX_WRAPPING", "backend_pools", "is_sniffer", "reachable", "within"]

#: How many wrapping factories (``TerminateTLS``, a ``WrappingFactory``) are
#: looked through between a rule and what it hands connections to.
MAX_WRAPPING = 4


def is_sniffer(factory: object) -> bool:
    """Whether ``factory`` is a sniffing factory (it has ``rules`` and ``connections``: :class:`Tracked`)."""
    return hasattr(factory, "rules") and hasattr(factory, "connections")


def reachable(factory: object, seen: set[int] | None = None) -> Iterator[tuple[str, object]]:
    """
    ``(rule name, factory)`` for each factory reachable from ``factory``'s
    rules, ``on_timeout`` and ``on_no_match``, each once: a rule's factory,
    what it wraps (``TerminateTLS``'s ``factory``, a ``WrappingFactory``'s
    ``wrappedFactory``), and, for a nested sniffing factory, what is
    reachable from its own rules, named by them.
    """
    seen = set() if seen is None else seen
    pairs: list[tuple[str, object]] = [(r.name, r.factory) for r in getattr(factory, "rules", ())]
    pairs += [(name, getattr(factory, name, None)) for name in ("on_timeout", "on_no_match")]
    for rule_name, target in pairs:
        yield from _chain(rule_name, target, seen)


def _chain(rule_name: str, target: object, seen: set[int]) -> Iterator[tuple[str, object]]:
    """``target``, what it wraps in turn, and what a sniffing factory among them reaches; ``seen`` is skipped."""
    depth = 0
    while target is not None and depth < MAX_WRAPPING and id(target) not in seen:
        seen.add(id(target))
        yield rule_name, target
        if is_sniffer(target):
            yield from reachable(target, seen)
            break
        if IBackendPool.providedBy(target):
            break
        target = getattr(target, "factory", None) or getattr(target, "wrappedFactory", None)
        depth += 1


def backend_pools(factory: object, seen: set[int] | None = None) -> Iterator[tuple[str, IBackendPool]]:
    """
    ``(rule name, pool)`` for each :class:`~muxtwist.interfaces.IBackendPool`
    (each :class:`~muxtwist.proxy.Proxy`) reachable from ``factory``'s rules,
    through wrapping factories (``TerminateTLS``) and nested sniffing
    factories; ``seen`` (ids) is skipped, and filled.
    """
    for rule_name, target in reachable(factory, seen):
        if IBackendPool.providedBy(target):
            yield rule_name, target


def within(factories: Iterable[object]) -> Iterator[object]:
    """Each of ``factories``, what it wraps, and every factory reachable from them, each once."""
    seen: set[int] = set()
    for factory in factories:
        yield from (target for _, target in _chain("", factory, seen))
