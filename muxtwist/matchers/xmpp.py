"""
XMPP: a client's stream header (RFC 6120, section 4.2), optionally after an
XML declaration: ``<stream:stream ... xmlns:stream='http://etherx.jabber.org/streams'>``.

Bytes read: an optional byte order mark and white space, an optional
``<?xml ...?>`` declaration, then the whole stream start tag up to its
``>``. The tag's name must be ``stream`` in the streams namespace (any
prefix). NO_MATCH at the first byte that cannot open such a tag; NEED_MORE
bound: ``MAX_HEADER`` bytes.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

import attrs
from zope.interface import implementer

from muxtwist._rules import needs_bytes
from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers import _options

__all__ = ["MAX_HEADER", "XMPP", "parse_stream_header"]

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

MAX_HEADER = 4096
STREAMS_NS = "http://etherx.jabber.org/streams"
_SPACE = re.compile(rb"[ \t\r\n]*+")
_START_TAG = re.compile(rb"""<(?:[^'"<>]++|"[^"<]*+"|'[^'<]*+')*+>""")
_NAME = re.compile(rb"[^\s/>]*+")
_ATTRIBUTE = re.compile(rb"""([\w.:-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")


def _skip_space(data: bytes, pos: int) -> int:
    end = _SPACE.match(data, pos)
    return pos if end is None else end.end()


def parse_stream_header(data: bytes) -> tuple[Verdict, dict[str, str] | None]:
    """(MATCH, attributes of the stream tag) for a complete XMPP stream header; never raises."""
    view = data[:MAX_HEADER]
    undecided = (NEED_MORE if len(data) < MAX_HEADER else NO_MATCH), None
    pos = _skip_space(view, 3 if view.startswith(b"\xef\xbb\xbf") else 0)
    if len(view) < 3 and b"\xef\xbb\xbf".startswith(view):
        return undecided
    rest = view[pos : pos + 5]
    if len(rest) < 5 and b"<?xml".startswith(rest):
        return undecided
    if rest.startswith(b"<?xml"):
        end = view.find(b"?>", pos)
        if end < 0:
            return undecided
        pos = _skip_space(view, end + 2)
    if pos == len(view):
        return undecided
    if view[pos] != 60:  # "<"
        return NO_MATCH, None
    name = _NAME.match(view, pos + 1)
    assert name is not None  # the pattern matches the empty string
    if name.end() == len(view):
        return undecided
    qname = name.group()
    if not (qname == b"stream" or (qname.endswith(b":stream") and len(qname) > 7)):
        return NO_MATCH, None
    tag = _START_TAG.match(view, pos)
    if tag is None:
        # Only a "<" can stop the tag from ever closing; a ">" may sit in a quoted value.
        if b"<" in view[pos + 1 :]:
            return NO_MATCH, None
        return undecided
    attributes = {k.decode("latin-1"): (a if a else b).decode("latin-1") for k, a, b in _ATTRIBUTE.findall(tag.group())}
    prefix = qname[:-7].decode("latin-1")
    if attributes.get(f"xmlns:{prefix}" if prefix else "xmlns") != STREAMS_NS:
        return NO_MATCH, None
    return MATCH, attributes


_domains = _options.strings("XMPP", "to", _options.host_glob)


def _globs(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    values = _domains(value)
    return None if values is None else tuple(v.lower() for v in values)


@needs_bytes
@implementer(IMatcher)
@attrs.frozen
class XMPP:
    """
    An XMPP stream header.

    :param to: a domain or glob, or a list, compared case-insensitively with
        the header's ``to`` attribute (the service the client wants).
    """

    to: tuple[str, ...] | None = attrs.field(default=None, converter=_globs)
    name: str = attrs.field(default="xmpp", kw_only=True, validator=_options.check_name)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        verdict, attributes = parse_stream_header(data)
        if attributes is None:
            return verdict
        if self.to is not None:
            to = attributes.get("to", "").lower()
            if not any(fnmatch.fnmatchcase(to, g) for g in self.to):
                return NO_MATCH
        return MATCH
