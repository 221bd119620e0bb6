"""
Which encodings a rules file may be written in: Python source must be in
an ASCII-compatible encoding (PEP 263), judged as CPython judges it.
"""

from __future__ import annotations

import codecs
import string

__all__ = ["not_for_source", "wide_encoding", "wide_without_mark"]

#: ASCII text a coding must decode as itself to be usable for Python source:
#: what a declaration, names, numbers and most syntax are written in. Not
#: ``+``, ``%``, ``\\`` or ``~``, which some encodings CPython accepts for
#: source (UTF-7, cp864, Shift_JIS-2004, HZ) read otherwise.
_ASCII_SAMPLE = (string.ascii_letters + string.digits + " \t\n\r#-*:=_.,;()[]{}<>'\"!?/|@").encode("ascii")

#: Byte order marks of encodings that are not ASCII-compatible (UTF-32 first: its little-endian mark begins UTF-16's).
_WIDE_MARKS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)

#: The encodings a file holding NUL bytes may be in without its byte order
#: mark (UTF-32 first: ASCII in UTF-32 reads as UTF-16 with NULs).
_WIDE_CODECS = (
    ("utf-32-le", "UTF-32 (little-endian)"),
    ("utf-32-be", "UTF-32 (big-endian)"),
    ("utf-16-le", "UTF-16 (little-endian)"),
    ("utf-16-be", "UTF-16 (big-endian)"),
)

#: How much of such a file is read to tell which of them it is in.
_WIDE_SAMPLE = 1024


def not_for_source(encoding: str) -> str | None:
    """
    Why text in ``encoding`` cannot be Python source (None if it can): Python
    reads a file's first lines as ASCII to find its coding declaration, so
    the encoding must write ASCII as ASCII (PEP 263). Judged as CPython
    judges it (``SyntaxError: encoding problem``) for every codec it ships.
    """
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        return "Python knows no encoding of that name"
    if not getattr(info, "_is_text_encoding", True):
        return "it is not a text encoding"  # hex, base64, rot13, zlib: bytes to bytes
    if info.name == "undefined":
        # The codec that raises at every use (a default encoding turned off): ASCII is the least of it.
        return "that codec refuses every byte, so no text can be read in it (save the file as UTF-8)"
    try:
        same = _ASCII_SAMPLE.decode(encoding) == _ASCII_SAMPLE.decode("ascii")
    except (UnicodeError, ValueError, TypeError, LookupError):
        same = False
    if not same:
        return "Python source must be in an ASCII-compatible encoding, and it is not (save the file as UTF-8)"
    return None


def wide_encoding(raw: bytes) -> str | None:
    """The name of the not ASCII-compatible encoding whose byte order mark ``raw`` starts with, if any."""
    for mark, wide in _WIDE_MARKS:
        if raw.startswith(mark):
            return wide
    return None


def wide_without_mark(raw: bytes) -> str | None:
    """
    The encoding a file holding NUL bytes is probably in, without its byte
    order mark: UTF-16 or UTF-32, either byte order, whichever reads the
    file's start as text with no NUL and mostly ASCII, as Python source is.
    ``None``: none does (a stray NUL, a file of NULs).
    """
    for codec, name in _WIDE_CODECS:
        try:
            text = codecs.getincrementaldecoder(codec)().decode(raw[:_WIDE_SAMPLE], final=False)
        except UnicodeDecodeError:
            continue
        if text and "\0" not in text and 2 * sum(c < "\x80" for c in text) >= len(text):
            return name
    return None
