"""
Endpoint description strings (``tcp:host=10.0.0.7:port=6379``,
``udp6:53:interface=\\:\\:1``) split into their parameters, the way
Twisted's ``clientFromString`` and ``serverFromString`` split them: ``:``
between parameters, the first ``=`` of a parameter between its name and its
value, a backslash making the next character literal.

Pure: no Twisted import, so the UDP listeners and the option checks can use
it without loading the reactor or the TLS stack.
"""

from __future__ import annotations

__all__ = ["split_description"]


def split_description(description: str) -> tuple[list[str], dict[str, str]]:
    """
    ``(positional, named)`` parameters of ``description``; the first
    positional one is the endpoint type (``tcp``, ``unix``, ``udp``...).

    ``split_description("tcp:host=\\\\:\\\\:1:port=80")`` is
    ``(["tcp"], {"host": "::1", "port": "80"})``.
    """
    positional: list[str] = []
    named: dict[str, str] = {}
    name: str | None = None
    current: list[str] = []
    characters = iter(description)
    for c in characters:
        if c == ":":
            if name is None:
                positional.append("".join(current))
            else:
                named[name] = "".join(current)
            name, current = None, []
        elif c == "=" and name is None:
            name, current = "".join(current), []
        elif c == "\\":
            current.append(next(characters, ""))
        else:
            current.append(c)
    if name is None:
        positional.append("".join(current))
    else:
        named[name] = "".join(current)
    return positional, named
