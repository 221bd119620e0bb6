"""
Rules and what the sniffer records per rule: :class:`Rule`, the checks that
rule names are unique, :class:`Outcome` (how a connection's sniffing ended)
and :class:`RuleStats` (a rule's connection counts).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import attrs
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import AbstractDatagramProtocol

from muxtwist._options import shown
from muxtwist.interfaces import IMatcher, IRespondingMatcher

__all__ = [
    "RESERVED_NAMES",
    "Outcome",
    "Rule",
    "RuleStats",
    "check_unique_names",
    "duplicate_names",
    "needs_bytes",
    "waits_for_bytes",
]


_M = TypeVar("_M", bound=type)


def needs_bytes(cls: _M) -> _M:
    """
    Mark a matcher class whose ``match`` says ``NEED_MORE`` to zero bytes,
    whatever the connection, and that writes nothing: the sniffer then does
    not ask its rule on connect (:func:`waits_for_bytes`). The mark names the
    ``match`` it vouches for, so a subclass with a ``match`` of its own is
    asked as any matcher is.
    """
    cls._needs_bytes = cls.match  # type: ignore[attr-defined]
    return cls


def waits_for_bytes(rules: Sequence[Rule]) -> bool:
    """
    Whether showing zero bytes to ``rules`` can only say "wait": no rules, or
    a first rule whose matcher is marked with :func:`needs_bytes` and does
    not answer (an :class:`~muxtwist.interfaces.IRespondingMatcher`'s
    ``respond`` may write on zero bytes); the rules are asked in order and
    the first ``NEED_MORE`` ends the asking.
    """
    if not rules:
        return True
    first = rules[0].matcher
    if IRespondingMatcher.providedBy(first):
        # The mark vouches for match() alone: a respond() may answer zero bytes (a banner).
        return False
    matcher = type(first)
    vouched = getattr(matcher, "_needs_bytes", None)
    return vouched is not None and vouched is getattr(matcher, "match", None)


def _provides(interface: Any, what: str, also: type | None = None) -> Callable[[Any, Any, Any], None]:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if not interface.providedBy(value) and not (also is not None and isinstance(value, also)):
            raise TypeError(f"Rule {attribute.name} must be {what}, got {shown(value)}")

    return check


def _rule_name(name: str | None, rule: Any) -> str:
    """``None`` means the default name: the matcher's."""
    if name is None:
        return str(getattr(rule.matcher, "name", "rule"))
    if not isinstance(name, str) or not name:
        raise TypeError(f"Rule name must be a non-empty string or None, got {shown(name)}")
    return name


#: Names the sniffer keeps its own statistics under; no rule may take them.
RESERVED_NAMES = ("on_timeout", "on_no_match")


def duplicate_names(rules: Sequence[Rule]) -> tuple[int, int, str] | None:
    """
    The first clash in ``rules``: ``(first index, second index, name)`` of
    two rules sharing a name (the second index is -1 when a rule takes a
    reserved name), or ``None`` when every name is unique.
    """
    seen: dict[str, int] = {}
    for i, rule in enumerate(rules):
        if rule.name in RESERVED_NAMES:
            return i, -1, rule.name
        if rule.name in seen:
            return seen[rule.name], i, rule.name
        seen[rule.name] = i
    return None


def check_unique_names(rules: Sequence[Rule]) -> None:
    """Raise ValueError naming both rules when two of ``rules`` share a name."""
    clash = duplicate_names(rules)
    if clash is None:
        return
    first, second, name = clash
    if second < 0:
        raise ValueError(
            f"rule {first} (matcher {shown(rules[first].matcher)}) takes the reserved name {shown(name)}; "
            "give it another name="
        )
    raise ValueError(
        f"rules {first} (matcher {shown(rules[first].matcher)}) and {second} (matcher {shown(rules[second].matcher)}) "
        f"are both named {shown(name)}; rule names key limits, statistics and metrics: give each a unique name="
    )


@attrs.frozen
class Rule:
    """
    Send connections whose first bytes ``matcher`` matches to ``factory``.

    :param matcher: an :class:`~muxtwist.interfaces.IMatcher`.
    :param factory: any ``IProtocolFactory``: a ``Site``, a ``Proxy``,
        a ``TerminateTLS``, another ``SniffingFactory``.
    :param name: the label for logs, limits and metrics; ``None`` (the
        default) means the matcher's name. Names are unique per rule list:
        :class:`SniffingFactory` refuses a list where two rules share one.
    :param max_connections: the most connections this rule may hold open at
        once on one :class:`SniffingFactory`; a connection that matches it
        beyond that is closed (outcome ``rejected``) and counted as a limit
        rejection. ``None``: no limit.
    """

    matcher: IMatcher = attrs.field(validator=_provides(IMatcher, "an IMatcher"))
    # A UDP listener's rules hand flows to DatagramProtocols (muxtwist.udp).
    factory: IProtocolFactory = attrs.field(
        validator=_provides(IProtocolFactory, "an IProtocolFactory (or a DatagramProtocol)", AbstractDatagramProtocol)
    )
    name: str = attrs.field(
        kw_only=True,
        default=None,
        converter=attrs.Converter(_rule_name, takes_self=True),  # type: ignore[misc]
    )
    max_connections: int | None = attrs.field(kw_only=True, default=None)

    @max_connections.validator
    def _check_max_connections(self, attribute: Any, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"Rule max_connections must be a positive integer or None, got {shown(value)}")


class Outcome(enum.Enum):
    """How a connection's sniffing ended."""

    HANDED_OFF = "handed_off"
    TIMEOUT = "timeout"
    NO_MATCH = "no_match"
    REJECTED = "rejected"
    CLOSED = "closed_while_sniffing"
    ABORTED = "aborted_while_sniffing"
    BACKEND_FAILED = "backend_failed"


@attrs.define
class RuleStats:
    """
    Connection counts of one rule (or of ``on_timeout``/``on_no_match``;
    ``-`` for connections that ended before any rule got them): live and
    total, and for those that ended, bytes each way (what was sniffed, plus
    what an :class:`~muxtwist.interfaces.IConnectionReport` winner moved)
    and how many ended with each outcome.
    """

    active: int = 0
    total: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    outcomes: dict[str, int] = attrs.Factory(dict)
