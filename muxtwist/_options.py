"""
Checking the options an action is built with (``Proxy``, ``TerminateTLS``,
``RedirectToHTTPS``), so a mistake in ``rules.py`` fails where it is made,
with a message that names the option, the value given and what is expected,
instead of a ``TypeError`` deep inside Twisted when the first client comes.
"""

from __future__ import annotations

import math
import os
import reprlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["OptionError", "check_proxy", "check_redirect", "check_terminate_tls", "shown"]

#: The most characters of a value an error message shows: a long path whole,
#: not a whole string or integer of thousands.
SHOWN_LIMIT = 200


def _digits(number: int) -> int:
    """How many decimal digits ``number`` (not negative) has, without writing it out."""
    if number < 10:
        return 1
    digits = int(math.log10(number)) + 1
    # log10 is a float: near a power of ten it may be one out either way.
    if 10 ** (digits - 1) > number:
        digits -= 1
    elif 10**digits <= number:
        digits += 1
    return digits


class _Shown(reprlib.Repr):
    """reprlib's bounded repr, with an integer too long to show written as its first digits and its length."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxstring = self.maxother = self.maxlong = limit

    def repr_int(self, x: int, level: int) -> str:
        number = abs(x)
        digits = _digits(number)
        if digits + (x < 0) <= self.maxlong:
            return repr(x)
        lead = number // 10 ** (digits - 20)
        return f"{'-' if x < 0 else ''}{lead}... (an integer of {digits} digits)"


def shown(value: object, limit: int = SHOWN_LIMIT) -> str:
    """
    ``repr(value)`` for an error message: at most ``limit`` characters, and
    never an exception, whatever ``value`` is (an integer of a million
    digits, an object whose ``__repr__`` raises).
    """
    try:
        text = _Shown(limit).repr(value)
    except Exception:
        # reprlib already stands in for a __repr__ that raises; this is for a
        # __class__ or __getattribute__ that raises too.
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class OptionError(ValueError, TypeError):
    """An action option with a value it cannot take (both a ValueError and a TypeError)."""

    def __init__(self, owner: str, option: str, value: object, expected: str) -> None:
        super().__init__(f"{owner} option {option}={shown(value)}: expected {expected}")
        self.owner = owner
        self.option = option
        self.value = value
        self.expected = expected


def _plain(value: int | float) -> int | float:
    """
    ``value`` as a plain int or float, for the checks: a subclass's own
    comparisons (an ``__lt__`` that says a NaN is positive) are not asked.
    """
    return float.__float__(value) if isinstance(value, float) else int.__int__(value)


def _number(owner: str, option: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    # Not NaN, infinity or an int beyond a float: callLater would raise at each use.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < _plain(value) <= sys.float_info.max:
        raise OptionError(owner, option, value, "a positive number of seconds" + (" or None" if optional else ""))


def _integer(owner: str, option: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or _plain(value) < 1:
        raise OptionError(owner, option, value, "a positive integer" + (" or None" if optional else ""))


def _boolean(owner: str, option: str, value: object) -> None:
    if not isinstance(value, bool):
        raise OptionError(owner, option, value, "True or False")


def _client_endpoint(owner: str, option: str, description: object) -> None:
    from twisted.internet.endpoints import clientFromString

    if not isinstance(description, str) or not description:
        raise OptionError(owner, option, description, 'a client endpoint description such as "tcp:host=HOST:port=PORT"')

    class _NoReactor:
        pass

    try:
        clientFromString(_NoReactor(), description)
    except Exception as e:
        raise OptionError(
            owner, option, description, f'a client endpoint description such as "tcp:host=HOST:port=PORT" ({e})'
        ) from None


def check_proxy(
    backends: object,
    *,
    connect_timeout: object,
    idle_timeout: object,
    max_connections: object,
    max_fails: object,
    fail_timeout: object,
    splice: object,
    tls: object,
) -> None:
    """Raise :class:`OptionError` for the first ``Proxy`` option that cannot work."""
    if isinstance(backends, str):
        _client_endpoint("Proxy", "backends", backends)
    elif isinstance(backends, Sequence) and backends:
        for i, description in enumerate(backends):
            _client_endpoint("Proxy", f"backends[{i}]", description)
    else:
        raise OptionError("Proxy", "backends", backends, "an endpoint description string or a non-empty list of them")
    _number("Proxy", "connect_timeout", connect_timeout)
    _number("Proxy", "idle_timeout", idle_timeout, optional=True)
    _integer("Proxy", "max_connections", max_connections, optional=True)
    _integer("Proxy", "max_fails", max_fails)
    _number("Proxy", "fail_timeout", fail_timeout)
    _boolean("Proxy", "splice", splice)
    if isinstance(tls, str) and not tls:
        raise OptionError("Proxy", "tls", tls, "True, a hostname to verify, or a client TLS options object")


def check_terminate_tls(
    certificates: object,
    *,
    alpn: object,
    client_ca: object,
    handshake_timeout: object,
    resumption: object,
) -> None:
    """Raise :class:`OptionError` for the first ``TerminateTLS`` option that cannot work."""
    if not isinstance(certificates, str | os.PathLike | Mapping):
        raise OptionError(
            "TerminateTLS", "certificates", certificates, "a directory or file path, or a {hostname: path} mapping"
        )
    if alpn is not None:
        if (
            isinstance(alpn, str | bytes)
            or not isinstance(alpn, Sequence)
            or not all(isinstance(p, str) and p and p.isascii() for p in alpn)
        ):
            raise OptionError("TerminateTLS", "alpn", alpn, 'a list of protocol names such as ["h2", "http/1.1"]')
    if isinstance(certificates, Mapping):
        for host, paths in certificates.items():
            if isinstance(host, str) and (
                isinstance(paths, str | os.PathLike)
                or (
                    isinstance(paths, tuple | list)
                    and len(paths) == 2
                    and all(isinstance(p, str | os.PathLike) for p in paths)
                )
            ):
                continue
            raise OptionError(
                "TerminateTLS",
                f"certificates[{shown(host)}]",
                paths,
                "the path of a PEM file holding the chain and the key, or a (certificate path, key path) pair",
            )
    if client_ca is not None:
        expected = "the path of a PEM file of CA certificates, or None"
        if not isinstance(client_ca, str | os.PathLike):
            raise OptionError("TerminateTLS", "client_ca", client_ca, expected)
        try:
            with open(client_ca, "rb"):
                pass
        except OSError as e:
            raise OptionError("TerminateTLS", "client_ca", client_ca, f"{expected} ({e.strerror or e})") from None
    _number("TerminateTLS", "handshake_timeout", handshake_timeout)
    _boolean("TerminateTLS", "resumption", resumption)


def check_redirect(port: Any) -> None:
    """Raise :class:`OptionError` if ``RedirectToHTTPS``'s ``port`` is not a port number or None."""
    if port is None:
        return
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise OptionError("RedirectToHTTPS", "port", port, "a port number 1-65535, or None")
