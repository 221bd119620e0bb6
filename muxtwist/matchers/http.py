"""
HTTP/1.x: the request line and, when a rule asks about the host, the path or
headers, a bounded parse of the request head.

Bytes read: the request line (MATCH as soon as ``METHOD SP target SP
HTTP/1.x CRLF`` is complete, NO_MATCH at the first byte that cannot belong to
one); with ``host``/``path``/``headers`` the whole head up to the blank line.
NEED_MORE bound: ``MAX_REQUEST_LINE`` bytes for the request line,
``MAX_HEAD`` for the head; past those the verdict is NO_MATCH.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from urllib.parse import unquote_to_bytes

import attrs
from zope.interface import implementer

from muxtwist._options import shown
from muxtwist._rules import needs_bytes
from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers import _options

__all__ = ["HTTP1", "HTTP_METHODS", "MAX_HEAD", "MAX_REQUEST_LINE", "RequestHead", "parse_request_head"]

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

MAX_REQUEST_LINE = 8192
MAX_HEAD = 16384

#: The IANA HTTP method registry, but PRI, which only opens HTTP/2.
HTTP_METHODS: frozenset[bytes] = frozenset(
    m.encode()
    for m in (
        "ACL BASELINE-CONTROL BIND CHECKIN CHECKOUT CONNECT COPY DELETE GET HEAD LABEL LINK LOCK "
        "MERGE MKACTIVITY MKCALENDAR MKCOL MKREDIRECTREF MKWORKSPACE MOVE OPTIONS ORDERPATCH PATCH "
        "POST PROPFIND PROPPATCH PUT QUERY REBIND REPORT SEARCH TRACE UNBIND UNCHECKOUT UNLINK "
        "UNLOCK UPDATE UPDATEREDIRECTREF VERSION-CONTROL"
    ).split()
)
_LONGEST_METHOD = max(len(m) for m in HTTP_METHODS)
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_VERSIONS = (b"HTTP/1.0", b"HTTP/1.1")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def _request_line(data: bytes, methods: frozenset[bytes]) -> tuple[Verdict, int]:
    """
    Judge the request line: (MATCH, end of line), (NEED_MORE, 0) or (NO_MATCH, 0).
    """
    space = data.find(b" ", 0, _LONGEST_METHOD + 1)
    if space < 0:
        if len(data) > _LONGEST_METHOD or not any(m.startswith(data) for m in methods):
            return NO_MATCH, 0
        return NEED_MORE, 0
    if data[:space] not in methods:
        return NO_MATCH, 0
    end = data.find(b"\n", space, MAX_REQUEST_LINE)
    if end < 0:
        line = data[space + 1 : MAX_REQUEST_LINE].removesuffix(b"\r")
        if len(data) >= MAX_REQUEST_LINE or line.startswith(b" ") or _CONTROL.search(line):
            return NO_MATCH, 0
        return NEED_MORE, 0
    line = data[space + 1 : end].removesuffix(b"\r")
    target, sep, version = line.rpartition(b" ")
    if not sep or not target or b" " in target or version not in _VERSIONS:
        return NO_MATCH, 0
    if _CONTROL.search(target):
        return NO_MATCH, 0
    return MATCH, end + 1


@attrs.frozen
class RequestHead:
    """A parsed HTTP/1.x request head: method, target, version and headers (names lower-cased)."""

    method: bytes
    target: bytes
    version: bytes
    headers: tuple[tuple[bytes, bytes], ...]

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case), or ``None``."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_values(self, name: bytes) -> tuple[bytes, ...]:
        """Every value of header ``name`` (lower-case), in order."""
        return tuple(v for k, v in self.headers if k == name)

    @property
    def absolute_form(self) -> bool:
        """Whether the request target is an absolute URI (``http://host/path``), not a path with a URL in its query."""
        return _ABSOLUTE.match(self.target) is not None

    @property
    def host(self) -> str | None:
        """
        The host asked for, lower-cased, port and trailing dot removed; ``None``
        when there is none, when it is not a valid host, and when it is
        ambiguous: several ``Host`` headers (RFC 9112 section 3.2 makes that a
        400), or an absolute-form target (or a CONNECT's authority-form
        target) whose host differs from ``Host`` (servers disagree on which
        one counts, so a rule cannot know which site the server behind will
        serve, or which host a proxy behind will connect to).
        """
        values = self.header_values(b"host")
        if len(values) > 1:
            return None
        header = _host(values[0]) if values else None
        if self.absolute_form:
            authority = self.target.split(b"://", 1)[1]
            authority = re.split(rb"[/?#]", authority, maxsplit=1)[0].rpartition(b"@")[2]
        elif self.method == b"CONNECT":
            # The authority form (RFC 9112 section 3.2.3): the host a proxy
            # behind will connect to, whatever Host says.
            authority = self.target
        else:
            return header
        uri = _host(authority)
        if values and uri != header:
            return None
        return uri

    @property
    def path(self) -> str | None:
        """
        The path of the target without its query, normalised as servers such
        as nginx see it before choosing a location: percent-escapes decoded
        (UTF-8), repeated slashes merged, ``.`` and ``..`` segments resolved
        (RFC 3986 section 5.2.4), so ``/public/../admin`` and ``/%61dmin`` are
        ``/admin``. ``None`` when it does not decode, holds a control
        character, or has a dot segment with parameters (``/public/..;/admin``,
        which servers resolve differently).
        """
        target = self.target
        if self.absolute_form:
            rest = re.split(rb"[?#]", target.split(b"://", 1)[1], maxsplit=1)[0]
            target = b"/" + rest.split(b"/", 1)[1] if b"/" in rest else b"/"
        return _normalize_path(target.split(b"?", 1)[0].split(b"#", 1)[0])


def _normalize_path(raw: bytes) -> str | None:
    try:
        text = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if _CONTROL_TEXT.search(text):
        return None
    if not text.startswith("/"):
        return text  # "*", or a CONNECT target's authority
    segments = text.split("/")[1:]
    if any(";" in segment and segment.split(";", 1)[0] in (".", "..") for segment in segments):
        # "..;x": nginx keeps it as a name, servers that drop path parameters
        # (Tomcat, Jetty) climb a level: no path a rule can count on.
        return None
    out: list[str] = []
    for segment in segments:
        if segment == "..":
            if out:
                out.pop()
        elif segment not in (".", ""):
            out.append(segment)
    trailing = out and (text.endswith("/") or segments[-1] in (".", ".."))
    return "/" + "/".join(out) + ("/" if trailing else "")


_CONTROL_TEXT = re.compile(r"[\x00-\x1f\x7f]")


# An absolute-form request target starts with a URI scheme and "://"
# (RFC 9112 section 3.2.2); "/?next=http://x" is origin-form, whatever follows.
_ABSOLUTE = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://")
# A host as it may appear in Host or a URI authority: a DNS name or IPv4
# address, or an IPv6 literal in brackets, then an optional port. The rarer
# characters RFC 3986 allows in a reg-name (",", ";", "%", ...) name no host a
# rule could mean, so a value holding them matches no host rule.
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(?::[0-9]*)?")


def _host(raw: bytes) -> str | None:
    """A Host value or URI authority, normalised for comparison: lower case, no port, no trailing dot."""
    try:
        text = raw.decode("ascii").strip(" \t").lower()
    except UnicodeDecodeError:
        return None
    found = _HOST.fullmatch(text)
    if found is None:
        return None
    name = found.group(1)
    if name.startswith("["):
        return name[1:-1]
    return name.removesuffix(".") or None


def parse_request_head(data: bytes, methods: frozenset[bytes] = HTTP_METHODS) -> tuple[Verdict, RequestHead | None]:
    """
    Parse an HTTP/1.x request head from the start of ``data``.

    (MATCH, head) once the blank line ending the head has arrived;
    (NEED_MORE, None) while it could still come within ``MAX_HEAD`` bytes;
    (NO_MATCH, None) for anything that is not a request head.
    """
    verdict, line_end = _request_line(data, methods)
    if verdict is not MATCH:
        return verdict, None
    end = data.find(b"\n\r\n", line_end - 1, MAX_HEAD)
    end_lf = data.find(b"\n\n", line_end - 1, MAX_HEAD)
    ends = [e for e in (end, end_lf) if e >= 0]
    if not ends:
        return (NO_MATCH if len(data) >= MAX_HEAD else NEED_MORE), None
    head_end = min(ends)
    method, _, rest = data[:line_end].partition(b" ")
    target, _, version = rest.strip().rpartition(b" ")
    headers = []
    for raw in data[line_end : head_end + 1].split(b"\n"):
        raw = raw.removesuffix(b"\r")
        if not raw:
            continue
        name, colon, value = raw.partition(b":")
        if not colon or not name or any(c not in _TCHAR for c in name):
            return NO_MATCH, None
        headers.append((name.lower(), value.strip(b" \t")))
    return MATCH, RequestHead(method, target, version, tuple(headers))


_host_globs = _options.strings("HTTP1", "host", _options.host_glob)
_path_strings = _options.strings("HTTP1", "path", _options.path_glob)


def _path_globs(paths: object) -> tuple[str, ...] | None:
    return _path_strings(paths)


def _methods(methods: object) -> frozenset[bytes]:
    if methods is None:
        return HTTP_METHODS
    values = (methods,) if isinstance(methods, str | bytes) else _options.iterable("HTTP1", "methods", methods)
    if not values:
        raise ValueError("HTTP1 methods must name at least one method, got an empty list")
    out = set()
    for m in values:
        if not isinstance(m, str | bytes):
            raise TypeError(f"HTTP1 methods must be str or bytes method names, got {_options.describe(m)}")
        text = m.decode("latin-1") if isinstance(m, bytes) else m
        problem = _options.token(text)
        if problem is not None:
            raise ValueError(f"HTTP1 methods entries {problem}, got {shown(m)}")
        out.add(text.upper().encode("ascii"))
    return frozenset(out)


def _hosts(hosts: object) -> tuple[str, ...] | None:
    globs = _host_globs(hosts)
    return None if globs is None else tuple(g.lower().removesuffix(".") for g in globs)


def _headers(headers: object) -> tuple[tuple[bytes, str | None], ...] | None:
    if headers is None:
        return None
    items = headers.items() if isinstance(headers, Mapping) else _options.iterable("HTTP1", "headers", headers)
    out = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(
                f"HTTP1 headers must be a mapping or (name, glob or None) pairs, got {_options.describe(item)}"
            )
        name, glob = item
        if not isinstance(name, str):
            raise TypeError(f"HTTP1 headers names must be str, got {_options.describe(name)}")
        problem = _options.token(name)
        if problem is not None:
            raise ValueError(f"HTTP1 headers names {problem}, got {shown(name)}")
        if glob is not None and not isinstance(glob, str):
            raise TypeError(f"HTTP1 headers values must be a str glob or None, got {_options.describe(glob)}")
        out.append((name.lower().encode("ascii"), None if glob is None else glob.lower()))
    return tuple(out)


@needs_bytes
@implementer(IMatcher)
@attrs.frozen
class HTTP1:
    """
    An HTTP/1.0 or 1.1 request.

    :param methods: method names to accept (default: every registered method).
    :param host: a host name or glob (``*.example.com``), or a list of them,
        compared case-insensitively with the Host header or the host of an
        absolute-form target (port and a trailing dot ignored). A request
        whose host is ambiguous (two ``Host`` headers, or an absolute URI or
        ``CONNECT`` target naming another host than ``Host``) matches no
        host rule.
    :param path: a path or glob (``/api/*``), or a list, compared with the
        request path (query ignored), normalised as :attr:`RequestHead.path`
        says (``/api/../admin`` is ``/admin``).
    :param headers: ``{name: glob or None}``; every header must be present
        (``None``) or have a value matching the glob, case-insensitively.
    """

    methods: frozenset[bytes] = attrs.field(default=None, converter=_methods)
    host: tuple[str, ...] | None = attrs.field(default=None, converter=_hosts)
    path: tuple[str, ...] | None = attrs.field(default=None, converter=_path_globs)
    headers: tuple[tuple[bytes, str | None], ...] | None = attrs.field(default=None, converter=_headers)
    name: str = attrs.field(default="http1", kw_only=True, validator=_options.check_name)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        if self.host is None and self.path is None and self.headers is None:
            return _request_line(data, self.methods)[0]
        verdict, head = parse_request_head(data, self.methods)
        if head is None:
            return verdict
        return MATCH if self._head_matches(head) else NO_MATCH

    def _head_matches(self, head: RequestHead) -> bool:
        if self.host is not None:
            host = head.host
            if host is None or not any(fnmatch.fnmatchcase(host, g) for g in self.host):
                return False
        if self.path is not None:
            path = head.path
            if path is None or not any(fnmatch.fnmatchcase(path, g) for g in self.path):
                return False
        for name, glob in self.headers or ():
            value = head.header(name)
            if value is None:
                return False
            if glob is not None and not fnmatch.fnmatchcase(value.decode("latin-1").lower(), glob):
                return False
        return True
