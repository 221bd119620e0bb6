"""Sphinx configuration for the muxtwist documentation."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from docutils import nodes
from docutils.parsers.rst import Directive
from docutils.statemachine import StringList

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
OPTIONAL_PAGES = [
    "matchers",
    "proxy",
    "tls",
    "proxy-protocol",
    "metrics",
    "operations",
    "performance",
    "reliability",
]
PLACEHOLDER = ".. optional-pages::"


def _optional_pages() -> list[str]:
    return [p for p in OPTIONAL_PAGES if any(os.path.exists(os.path.join(HERE, p + ext)) for ext in (".md", ".rst"))]


def _fill_toctree(app: Any, docname: str, source: list[str]) -> None:
    if docname != "index" or PLACEHOLDER not in source[0]:
        return
    pages = _optional_pages()
    entries = "".join(f"   {p}\n" for p in pages)
    caption = "Protocols, proxies, TLS and operations"
    block = f".. toctree::\n   :maxdepth: 2\n   :caption: {caption}\n\n{entries}" if pages else ""
    source[0] = source[0].replace(PLACEHOLDER + "\n", block)


class InterfaceDirective(Directive):
    """
    ``.. interface:: muxtwist.interfaces.IMatcher``: a zope interface with its
    attributes and methods, from their docstrings (autodoc only knows classes).
    """

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        import inspect
        import textwrap

        from zope.interface.interface import Method

        module_name, _, name = self.arguments[0].rpartition(".")
        interface = getattr(importlib.import_module(module_name), name)
        bases = [b.getName() for b in interface.__bases__ if b.getName() != "Interface"]
        lines = [f".. py:class:: {name}", f"   :module: {module_name}", ""]
        if bases:
            lines += [f"   Extends: {', '.join(f':class:`{b}`' for b in bases)}.", ""]
        lines += ["   " + line for line in inspect.cleandoc(interface.__doc__ or "").splitlines()] + [""]
        for member_name, member in interface.namesAndDescriptions():
            doc = textwrap.indent(inspect.cleandoc(member.getDoc() or ""), "      ")
            if isinstance(member, Method):
                lines += [f"   .. py:method:: {member_name}{member.getSignatureString()}", "", doc, ""]
            else:
                lines += [f"   .. py:attribute:: {member_name}", "", doc, ""]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=self.arguments[0]), self.content_offset, container)
        return container.children


def setup(app: Any) -> dict[str, Any]:
    app.connect("source-read", _fill_toctree)
    # The index's table of contents depends on which pages exist, so read it
    # again on every build, also an incremental one.
    app.connect("env-get-outdated", lambda app, env, added, changed, removed: ["index"])
    app.add_directive("interface", InterfaceDirective)
    return {"parallel_read_safe": True}
