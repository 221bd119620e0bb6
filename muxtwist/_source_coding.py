"""
Which encodings a rules file may be written in: Python source must be in
an ASCII-compatible encoding (PEP 263), judged as CPython judges it.
"""

from __future__ import annotations

import codecs
import string

__all__ = ["not_for_source", "wide_encoding"]

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
