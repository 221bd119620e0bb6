"""
Looking over a loaded set of rules for things that work, but not the way
their author probably expects: a ``TerminateTLS`` offering ``h2`` to a
``twisted.web`` ``Site`` that cannot speak HTTP/2, and access control or
traffic splits built on per-request fields (Host, path, headers) when
routing is decided once per connection.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from muxtwist._twisted import endpoint_port
from muxtwist.interfaces import IMatcher
from muxtwist.sniffing import Rule

__all__ = ["h2_unable_sites", "per_request_routing"]

#: Matchers a client that negotiated h2 can reach a rule through.
_H2_NAMES = frozenset({"http2", "h2", "grpc", "http2_header", "alpn", "any", "sni"})
#: Attributes of a matcher that look at one request rather than the connection.
_PER_REQUEST = ("host", "path", "headers")


def _matchers(matcher: object) -> Iterator[object]:
    yield matcher
    for inner in getattr(matcher, "matchers", ()) or ():
        yield from _matchers(inner)
    inner = getattr(matcher, "matcher", None)
    if inner is not None and IMatcher.providedBy(inner):
        yield from _matchers(inner)


def _names(matcher: object) -> set[str]:
    return {str(getattr(m, "name", "")) for m in _matchers(matcher)}


def _children(factory: object) -> Iterator[tuple[object, object]]:
    """(matcher or None, factory) for each factory a connection can be handed to from ``factory``."""
    for rule in getattr(factory, "rules", ()) or ():
        yield rule.matcher, rule.factory
    for name in ("on_timeout", "on_no_match"):
        other = getattr(factory, name, None)
        if other is not None:
            yield None, other
    for name in ("factory", "wrappedFactory"):
        inner = getattr(factory, name, None)
        if inner is not None:
            yield None, inner


def _h2_sites(factory: object, depth: int) -> Iterator[object]:
    """Sites reachable from ``factory`` by a client that negotiated h2."""
    from twisted.web.server import Site

    if depth > 8:
        return
    if isinstance(factory, Site):
        yield factory
        return
    for matcher, child in _children(factory):
        names = _names(matcher) if matcher is not None else set()
        if "http1" in names and not names & _H2_NAMES:
            continue
        yield from _h2_sites(child, depth + 1)


def _tls_terminators(factories: Sequence[object], depth: int = 0) -> Iterator[object]:
    from muxtwist.tls import TerminateTLS

    if depth > 8:
        return
    for factory in factories:
        if isinstance(factory, TerminateTLS):
            yield factory
        yield from _tls_terminators([child for _, child in _children(factory)], depth + 1)


def h2_unable_sites(rules: Sequence[Rule]) -> list[tuple[object, str]]:
    """
    ``(terminate_tls, site)`` for each ``TerminateTLS`` in ``rules`` (nested
    ones too) that offers ``h2`` while a ``Site`` a client could reach after
    negotiating it cannot speak HTTP/2 (Twisted's ``http2`` extra missing).
    """
    from twisted.web import http

    if getattr(http, "H2_ENABLED", False):
        return []
    found: list[tuple[object, str]] = []
    for tls in _tls_terminators([rule.factory for rule in rules]):
        if "h2" not in getattr(tls, "alpn", ()):
            continue
        for site in _h2_sites(getattr(tls, "factory", None), 0):
            found.append((tls, type(site).__name__))
            break
    return found


def _per_request_fields(matcher: object) -> list[str]:
    fields = []
    for m in _matchers(matcher):
        for attribute in _PER_REQUEST:
            if getattr(m, attribute, None) is not None and f"{attribute}=" not in fields:
                fields.append(f"{attribute}=")
        if getattr(m, "name", None) == "http2_header" and "header" not in fields:
            fields.append("header")
    return fields


def per_request_routing(rules: Sequence[Rule]) -> list[str]:
    """
    A warning for each rule that rejects, or splits off, connections by a
    per-request field (Host, path, a header): routing is decided on a
    connection's first request, so later requests on a keep-alive connection
    go to the same place whatever they say.
    """
    from muxtwist.actions import Reject

    warnings = []
    for rule in rules:
        fields = _per_request_fields(rule.matcher)
        if not fields:
            continue
        by = ", ".join(fields)
        if isinstance(rule.factory, Reject):
            warnings.append(
                f"rule {rule.name!r} rejects by {by} of the first request only: routing is per connection, so a "
                "client can send an allowed first request and then others on the same connection; put access "
                "control in the server behind"
            )
        elif "path=" in fields or "headers=" in fields or "header" in fields:
            warnings.append(
                f"rule {rule.name!r} splits by {by} of the first request only: later requests on a keep-alive "
                "connection reach the same server whatever their path or headers"
            )
    return warnings


def same_address(first: str, second: str) -> bool:
    """
    Whether server endpoint descriptions ``first`` and ``second`` cannot
    both listen: the same description, two TCP ones on the same port number
    other than 0 on the same interface or one of them on all interfaces, or
    two ``unix:`` ones on the same path.
    """
    import os

    from twisted.internet import endpoints

    from muxtwist._twisted import endpoint_unix_path

    if first == second:
        return True

    class _NoReactor:
        pass

    try:
        one, other = (endpoints.serverFromString(_NoReactor(), d) for d in (first, second))
    except Exception:
        return False
    paths = endpoint_unix_path(one), endpoint_unix_path(other)
    if paths[0] is not None and paths[1] is not None:
        return os.path.realpath(paths[0]) == os.path.realpath(paths[1])
    at, other_at = endpoint_port(one), endpoint_port(other)
    if at is None or other_at is None or at[0] != other_at[0] or not at[0]:
        return False
    everywhere = ("", "0.0.0.0", "::")
    return at[1] == other_at[1] or at[1] in everywhere or other_at[1] in everywhere


def probe_listen(description: str) -> str | None:
    """
    Why a TCP server endpoint ``description`` cannot listen right now (the
    port is taken, or needs privileges), or ``None`` if it can or is not TCP.
    Binding and closing at once, as ``twistd`` would bind: checked before
    ``twistd`` detaches, so that the error reaches the terminal.
    """
    import errno
    import socket

    from twisted.internet import endpoints

    class _NoReactor:
        pass

    try:
        endpoint = endpoints.serverFromString(_NoReactor(), description)
    except Exception:
        return None
    if isinstance(endpoint, endpoints.UNIXServerEndpoint):
        return _probe_unix(endpoint)
    port, interface = endpoint_port(endpoint) or (0, "")
    if not isinstance(endpoint, endpoints.TCP4ServerEndpoint | endpoints.TCP6ServerEndpoint) or not port:
        return None
    family = (
        socket.AF_INET6 if isinstance(endpoint, endpoints.TCP6ServerEndpoint) or ":" in interface else socket.AF_INET
    )
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((interface or ("::" if family == socket.AF_INET6 else ""), port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return "the address is already in use (another server listens there)"
            return e.strerror or str(e)
    return None


def _probe_unix(endpoint: object) -> str | None:
    """
    Why a UNIX server endpoint cannot listen right now: its directory is
    missing or not writable, or another live server holds its lock file.

    Why private: ``UNIXServerEndpoint`` keeps the parsed ``_address`` and
    ``_wantPID`` (the ``lockfile`` option) and exposes neither; parsing the
    description again would mean copying Twisted's parser. Checked on
    Twisted 26.10.0 (``twisted.internet.endpoints``).
    """
    import os

    from twisted.python.lockfile import isLocked

    held: Any = endpoint
    address = held._address
    if not isinstance(address, str):
        return None
    directory = os.path.dirname(os.path.abspath(address))
    if not os.path.isdir(directory):
        return f"the directory {directory} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"cannot create a socket in {directory}: permission denied"
    lock = address + ".lock"
    try:
        locked = held._wantPID and isLocked(lock)
    except OSError as e:
        return f"cannot make its lock file {lock}: {e.strerror or e}"
    if locked:
        try:
            owner = f" (process {os.readlink(lock)})"
        except OSError:
            owner = ""
        return f"another server holds its lock file {lock}{owner}"
    return None


#: twistd's own options, which go before the plugin name.
TWISTD_OPTIONS = frozenset(
    "-n --nodaemon --pidfile -l --logfile -d --rundir -u --uid -g --gid --umask -r --reactor --logger --syslog "
    "--prefix --chroot --euid -b --debug --profile --spew -o --no_save --savestats --profiler".split()
)


def twistd_option_hint(message: str) -> str | None:
    """For twistd's "option X not recognized" about one of twistd's own options: where it belongs."""
    import re

    found = re.match(r"option (-{1,2}[\w-]+) not recognized", message)
    if found is None or found.group(1) not in TWISTD_OPTIONS:
        return None
    option = found.group(1)
    return (
        f"{option} is an option of twistd itself: put it before the plugin name, "
        f"as in: twistd {option}{' ...' if option not in ('-n', '--nodaemon') else ''} muxtwist --port 3000"
    )
