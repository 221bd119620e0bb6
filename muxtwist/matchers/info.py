"""
Matchers on what TLS termination learnt of a connection: the server name the
client asked for (SNI) and the protocol negotiated with ALPN.

They look only at :class:`~muxtwist.interfaces.ConnectionInfo`, never at the
bytes, so they decide at once, before the client has sent anything. Outside
:class:`~muxtwist.tls.TerminateTLS` both fields are ``None`` and they never
match; to route on the SNI of a TLS stream you do not terminate, use the TLS
matcher, which reads the ClientHello.
"""

from __future__ import annotations

import fnmatch
import re

import attrs
from zope.interface import implementer

from muxtwist._options import shown
from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers import _options

__all__ = ["ALPN", "SNI"]


def _compile(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p.lower().rstrip('.'))})" for p in patterns))


@implementer(IMatcher)
@attrs.frozen
class SNI:
    """
    The client asked for one of ``patterns``: host names or shell-style globs
    (``*.example.com``; ``*`` also spans dots, so it covers
    ``a.b.example.com`` too), compared case-insensitively. A client that sent
    no SNI never matches.
    """

    patterns: tuple[str, ...]
    name: str
    _regex: re.Pattern[str] = attrs.field(repr=False, eq=False)

    def __init__(self, *patterns: str, name: str = "sni") -> None:
        if not patterns:
            raise ValueError("SNI() needs at least one name or pattern")
        if not all(isinstance(p, str) and p for p in patterns):
            raise TypeError(f"SNI() takes non-empty strings, got {shown(patterns)}")
        _options.check_name(self, None, name)
        self.__attrs_init__(tuple(patterns), name, _compile(patterns))  # type: ignore[attr-defined]

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        sni = info.sni
        if sni and self._regex.match(sni.lower().rstrip(".")):
            return Verdict.MATCH
        return Verdict.NO_MATCH


@implementer(IMatcher)
@attrs.frozen
class ALPN:
    """
    ALPN negotiated one of ``protocols`` (``"h2"``, ``"http/1.1"``, ...).

    A :class:`~muxtwist.tls.TerminateTLS` around rules with ``ALPN`` matchers
    offers those protocols to clients.
    """

    protocols: tuple[str, ...]
    name: str

    def __init__(self, *protocols: str, name: str = "alpn") -> None:
        if not protocols:
            raise ValueError("ALPN() needs at least one protocol")
        if not all(isinstance(p, str) and p for p in protocols):
            raise TypeError(f"ALPN() takes non-empty strings, got {shown(protocols)}")
        _options.check_name(self, None, name)
        self.__attrs_init__(tuple(protocols), name)  # type: ignore[attr-defined]

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        return Verdict.MATCH if info.alpn in self.protocols else Verdict.NO_MATCH
