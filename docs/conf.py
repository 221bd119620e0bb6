"""Sphinx configuration for the muxtwist documentation."""

from __future__ import annotations

import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from muxtwist import __version__  # noqa: E402

project = "muxtwist"
author = "the muxtwist authors"
copyright = "the muxtwist authors"
version = release = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"muxtwist {release}"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
nitpicky = False
# No network at build time: cross-references to Twisted and Python stay plain text.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

myst_heading_anchors = 3

#: Pages that other parts of the project bring along as they land, in the
#: order they should appear; only those that exist go into the table of
#: contents, so the build neither breaks nor leaves them out.
OPTIONAL_PAGES = ["matchers", "proxy", "tls", "proxy-protocol", "metrics", "operations"]
PLACEHOLDER = ".. optional-pages::"


def _optional_pages() -> list[str]:
    return [p for p in OPTIONAL_PAGES if any(os.path.exists(os.path.join(HERE, p + ext)) for ext in (".md", ".rst"))]


def _fill_toctree(app: Any, docname: str, source: list[str]) -> None:
    if docname != "index" or PLACEHOLDER not in source[0]:
        return
    pages = _optional_pages()
    entries = "".join(f"   {p}\n" for p in pages)
    block = f".. toctree::\n   :maxdepth: 2\n   :caption: Protocols, proxies and TLS\n\n{entries}" if pages else ""
    source[0] = source[0].replace(PLACEHOLDER + "\n", block)


def setup(app: Any) -> dict[str, Any]:
    app.connect("source-read", _fill_toctree)
    return {"parallel_read_safe": True}
