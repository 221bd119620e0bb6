"""
Checks for matcher options, run when a matcher is built: a wrong option is
an error naming the matcher, the option, the value given and what is
expected (``HTTP1 host must be str or a list of str, got b'a.test'
(bytes)``), never a matcher that fails later or silently never matches.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from muxtwist._options import shown

__all__ = ["boolean", "check_name", "describe", "strings", "text_or_none"]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def describe(value: object) -> str:
    """A value as an error message shows it: its repr (cut, see :func:`muxtwist._options.shown`) and its type."""
    return f"{shown(value)} ({type(value).__name__})"


def check_name(instance: object, attribute: Any, value: object) -> None:
    """attrs validator: a matcher's ``name`` is a non-empty str."""
    owner = type(instance).__name__
    if not isinstance(value, str):
        raise TypeError(f"{owner} name must be a non-empty str, got {describe(value)}")
    if not value:
        raise ValueError(f"{owner} name must be a non-empty str, got ''")


def boolean(owner: str, option: str) -> Callable[[object, Any, object], None]:
    """attrs validator: the option is a bool."""

    def validate(instance: object, attribute: Any, value: object) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"{owner} {option} must be True or False, got {describe(value)}")

    return validate


def text_or_none(owner: str, option: str) -> Callable[[object, Any, object], None]:
    """attrs validator: the option is a str or ``None``."""

    def validate(instance: object, attribute: Any, value: object) -> None:
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{owner} {option} must be str or None, got {describe(value)}")

    return validate


def strings(
    owner: str, option: str, check: Callable[[str], str | None] | None = None
) -> Callable[[object], tuple[str, ...] | None]:
    """
    A converter taking ``None``, one str or an iterable of str, and giving
    ``None`` or a non-empty tuple of non-empty str; ``check`` returns what
    is wrong with one value (``"must start with /"``) or ``None``.
    """
    expected = f"{owner} {option} must be str or a list of str"

    def convert(value: object) -> tuple[str, ...] | None:
        if value is None:
            return None
        if isinstance(value, str):
            values: tuple[object, ...] = (value,)
        elif isinstance(value, bytes | bytearray) or not isinstance(value, Iterable):
            raise TypeError(f"{expected}, got {describe(value)}")
        else:
            values = tuple(value)
        if not values:
            raise ValueError(f"{owner} {option} must name at least one value, got {shown(value)}")
        for v in values:
            if not isinstance(v, str):
                raise TypeError(f"{expected}, got {describe(v)}")
            if not v:
                raise ValueError(f"{owner} {option} must not be an empty string, got {shown(value)}")
            problem = check(v) if check is not None else None
            if problem is not None:
                raise ValueError(f"{owner} {option} {problem}, got {shown(v)}")
        return values  # type: ignore[return-value]

    return convert


def token(value: str) -> str | None:
    """What is wrong with an HTTP token (a method or header name), or ``None``."""
    return None if _TOKEN.fullmatch(value) else "must be an HTTP token (letters, digits, !#$%&'*+-.^_`|~)"


def host_glob(value: str) -> str | None:
    """What is wrong with a host name or glob, or ``None``: no scheme, path or port."""
    if "/" in value:
        return "is a host name or glob, without scheme or path (such as 'a.test' or '*.a.test')"
    if value.count(":") == 1:
        return "is compared without a port (the port is ignored): leave ':port' out"
    if value.strip() != value or " " in value:
        return "must not contain spaces"
    return None


def path_glob(value: str) -> str | None:
    """What is wrong with a path glob, or ``None``: it starts with / (or is a glob starting with *)."""
    if not value.startswith(("/", "*")):
        return "must start with / (or be a glob starting with *)"
    return None


def iterable(owner: str, option: str, value: object) -> tuple[object, ...]:
    """``value`` as a tuple, or a TypeError if it is not a list-like (a str or bytes is not)."""
    if isinstance(value, str | bytes | bytearray) or not isinstance(value, Iterable):
        raise TypeError(f"{owner} {option} must be a list, got {describe(value)}")
    return tuple(value)
