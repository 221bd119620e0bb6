"""
The general matchers: any first byte, fixed prefixes, regular expressions,
the client's address, and the combinators that join matchers.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

import attrs
from zope.interface import implementer

from muxtwist._options import shown
from muxtwist._rules import needs_bytes
from muxtwist.interfaces import ConnectionInfo, IMatcher, IRespondingMatcher, Verdict
from muxtwist.matchers import _options

__all__ = ["AllOf", "Any", "AnyOf", "Not", "Prefix", "Regex", "RemoteAddress", "source_ip"]

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@needs_bytes
@implementer(IMatcher)
@attrs.frozen
class Any:
    """
    Any connection that has sent at least one byte.

    A connection that stays silent is left to ``on_timeout``, so a catch-all
    ``Any()`` rule does not swallow server-speaks-first clients.
    """

    name: str = attrs.field(default="any", kw_only=True, validator=_options.check_name)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        return MATCH if data else NEED_MORE


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else bytes(value)


@implementer(IMatcher)
@attrs.frozen
class Prefix:
    """
    The stream starts with one of ``prefixes`` (``bytes``, or ``str`` taken as
    latin-1). NEED_MORE while the buffer is a proper prefix of one of them.
    """

    prefixes: tuple[bytes, ...]
    name: str

    def __init__(self, *prefixes: bytes | str, name: str = "prefix") -> None:
        if not prefixes:
            raise ValueError("Prefix() needs at least one prefix")
        for p in prefixes:
            if not isinstance(p, bytes | str):
                raise TypeError(f"Prefix prefixes must be bytes or str, got {_options.describe(p)}")
        values = tuple(_as_bytes(p) for p in prefixes)
        if any(not p for p in values):
            raise ValueError("Prefix() prefixes must not be empty")
        self.__attrs_init__(values, name)  # type: ignore[attr-defined]

    def __attrs_post_init__(self) -> None:
        _options.check_name(self, None, self.name)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        verdict = NO_MATCH
        for prefix in self.prefixes:
            if data.startswith(prefix):
                return MATCH
            if prefix.startswith(data):
                verdict = NEED_MORE
        return verdict


def _compile(pattern: bytes | str | re.Pattern[bytes]) -> re.Pattern[bytes]:
    if isinstance(pattern, re.Pattern):
        if not isinstance(pattern.pattern, bytes):
            raise TypeError(
                f"Regex pattern must be a bytes pattern (or bytes or str), got {shown(pattern)} (a str pattern)"
            )
        return pattern
    if not isinstance(pattern, bytes | str):
        raise TypeError(
            f"Regex pattern must be bytes, str or a compiled bytes pattern, got {_options.describe(pattern)}"
        )
    try:
        return re.compile(_as_bytes(pattern))
    except (re.error, UnicodeEncodeError) as e:
        raise ValueError(f"Regex pattern must be a valid regular expression, got {shown(pattern)}: {e}") from None


def _min_length(instance: object, attribute: object, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Regex min_length must be an int, got {_options.describe(value)}")
    if value < 0:
        raise ValueError(f"Regex min_length must be 0 or more, got {shown(value)}")


@implementer(IMatcher)
@attrs.frozen
class Regex:
    """
    ``pattern`` (a bytes or str regular expression) found anywhere in the
    buffer. Until ``min_length`` bytes have arrived a miss is NEED_MORE; after
    that it is NO_MATCH, so set ``min_length`` to how many bytes the pattern
    needs to see.
    """

    pattern: re.Pattern[bytes] = attrs.field(converter=_compile)
    min_length: int = attrs.field(default=0, validator=_min_length)
    name: str = attrs.field(default="regex", kw_only=True, validator=_options.check_name)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        if self.pattern.search(data) is not None:
            return MATCH
        if len(data) < self.min_length or not data:
            return NEED_MORE
        return NO_MATCH


def source_ip(info: ConnectionInfo) -> _IP | None:
    """The client's IP address (after PROXY), v4-mapped IPv6 unwrapped; ``None`` for non-IP peers."""
    address = info.source
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_networks(cidrs: Iterable[str]) -> tuple[_Network, ...]:
    """Parse CIDR strings (a bare address is a /32 or /128), with a clear error."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError as e:
            raise ValueError(f"not an IP network: {shown(cidr)} ({e})") from None
    return tuple(networks)


def in_networks(ip: _IP | None, networks: tuple[_Network, ...]) -> bool:
    """Whether ``ip`` lies in one of ``networks`` (an IPv4 network also covers v4-mapped IPv6)."""
    if ip is None:
        return False
    return any(ip.version == net.version and ip in net for net in networks)


@implementer(IMatcher)
@attrs.frozen
class RemoteAddress:
    """
    The client (the PROXY source when one was accepted) is in one of the
    networks. Decides at once, before any byte arrives.
    """

    networks: tuple[_Network, ...]
    name: str

    def __init__(self, *cidrs: str, name: str = "remote_address") -> None:
        if not cidrs:
            raise ValueError("RemoteAddress() needs at least one network")
        for cidr in cidrs:
            if not isinstance(cidr, str):
                raise TypeError(
                    f"RemoteAddress networks must be str (such as '10.0.0.0/8'), got {_options.describe(cidr)}"
                )
        try:
            networks = parse_networks(cidrs)
        except ValueError as e:
            raise ValueError(f"RemoteAddress networks must be IP networks: {e}") from None
        self.__attrs_init__(networks, name)  # type: ignore[attr-defined]

    def __attrs_post_init__(self) -> None:
        _options.check_name(self, None, self.name)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        return MATCH if in_networks(source_ip(info), self.networks) else NO_MATCH


def _check_matchers(matchers: tuple[object, ...], combinator: str, name: object = None) -> tuple[IMatcher, ...]:
    for m in matchers:
        if not IMatcher.providedBy(m):
            raise TypeError(f"{combinator}() takes matchers, got {shown(m)}")
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"{combinator} name must be a non-empty str or None, got {_options.describe(name)}")
    return matchers  # type: ignore[return-value]


class _Responding:
    """Passes a child's declared bytes (see IRespondingMatcher) through a combinator."""

    matchers: tuple[IMatcher, ...]

    def respond(self, data: bytes, info: ConnectionInfo) -> bytes:
        for m in self.matchers:
            if IRespondingMatcher.providedBy(m) and m.match(data, info) is NEED_MORE:
                out: bytes = m.respond(data, info)
                if out:
                    return out
        return b""

    def filter_replay(self, data: bytes) -> bytes:
        for m in self.matchers:
            if IRespondingMatcher.providedBy(m):
                data = m.filter_replay(data)
        return data


@implementer(IRespondingMatcher)
@attrs.frozen
class AnyOf(_Responding):
    """MATCH when one of the matchers matches; NEED_MORE while one of them is undecided."""

    matchers: tuple[IMatcher, ...]
    name: str

    def __init__(self, *matchers: IMatcher, name: str | None = None) -> None:
        checked = _check_matchers(matchers, "AnyOf", name)
        self.__attrs_init__(checked, name or "|".join(m.name for m in checked))  # type: ignore[attr-defined]

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        verdict = NO_MATCH
        for m in self.matchers:
            v = m.match(data, info)
            if v is MATCH:
                return MATCH
            if v is NEED_MORE:
                verdict = NEED_MORE
        return verdict


@implementer(IRespondingMatcher)
@attrs.frozen
class AllOf(_Responding):
    """MATCH when every matcher matches; NO_MATCH as soon as one of them says NO_MATCH."""

    matchers: tuple[IMatcher, ...]
    name: str

    def __init__(self, *matchers: IMatcher, name: str | None = None) -> None:
        checked = _check_matchers(matchers, "AllOf", name)
        self.__attrs_init__(checked, name or "&".join(m.name for m in checked))  # type: ignore[attr-defined]

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        verdict = MATCH
        for m in self.matchers:
            v = m.match(data, info)
            if v is NO_MATCH:
                return NO_MATCH
            if v is NEED_MORE:
                verdict = NEED_MORE
        return verdict


@implementer(IMatcher)
@attrs.frozen
class Not:
    """MATCH where ``matcher`` says NO_MATCH and the other way round; NEED_MORE stays."""

    matcher: IMatcher
    name: str

    def __init__(self, matcher: IMatcher, name: str | None = None) -> None:
        (checked,) = _check_matchers((matcher,), "Not", name)
        self.__attrs_init__(checked, name or f"not-{checked.name}")  # type: ignore[attr-defined]

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        v = self.matcher.match(data, info)
        if v is NEED_MORE:
            return NEED_MORE
        return NO_MATCH if v is MATCH else MATCH
