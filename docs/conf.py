"""Sphinx configuration for the muxtwist documentation."""

from __future__ import annotations

import importlib
import os
import posixpath
import re
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
nitpicky = True
# No network at build time: the inventories are files in the repository,
# listing the Twisted, Python and pyOpenSSL names we refer to, with links to
# their published pages (docs/_inventories/make_inventories.py writes them).
intersphinx_mapping: dict[str, tuple[str, str | None]] = {
    "python": ("https://docs.python.org/3/", os.path.join(HERE, "_inventories", "python.inv")),
    "twisted": ("https://docs.twisted.org/en/stable/api/", os.path.join(HERE, "_inventories", "twisted.inv")),
    "pyopenssl": ("https://www.pyopenssl.org/en/stable/", os.path.join(HERE, "_inventories", "pyopenssl.inv")),
}
intersphinx_disabled_reftypes: list[str] = []
#: prometheus-client publishes no inventory.
#: Private names (a module, class or method whose name starts with ``_``:
#: ``muxtwist._splice``, ``_Responding``) are not part of the documented API;
#: references to them stay plain text.
nitpick_ignore_regex = [(r"py:.*", r"(.*\.)?_[A-Za-z]\w*(\..*)?")]
nitpick_ignore = [
    ("py:class", "CollectorRegistry"),
    ("py:class", "prometheus_client.registry.CollectorRegistry"),
    # A prometheus-client collector (its bases have no inventory); its series
    # are listed in the UDP reference page.
    ("py:class", "muxtwist.udp.stats.UDPStats"),
]

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


class AllInterfacesDirective(Directive):
    """
    ``.. all-interfaces:: muxtwist.interfaces``: an ``interface`` entry for
    every zope interface the module lists in ``__all__``, in that order, so a
    new interface is documented as soon as it is exported.
    """

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        from zope.interface.interface import InterfaceClass

        module = importlib.import_module(self.arguments[0])
        names = [n for n in getattr(module, "__all__", ()) if isinstance(getattr(module, n), InterfaceClass)]
        lines = [f".. interface:: {self.arguments[0]}.{name}" for name in names]
        container = nodes.container()
        self.state.nested_parse(
            StringList([x for line in lines for x in (line, "")], source=self.arguments[0]),
            self.content_offset,
            container,
        )
        return container.children


def _show_interfaces_by_name() -> None:
    """
    Type hints that are zope interfaces (``IAddress``) show as their dotted
    names, which link, instead of ``<InterfaceClass ...>``.
    """
    from zope.interface.interface import InterfaceClass

    InterfaceClass.__repr__ = lambda self: f"{self.__module__}.{self.__name__}"  # type: ignore[method-assign,assignment]


_show_interfaces_by_name()


def _resolve_short_names(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """
    A reference by a short name (``IProtocolFactory``, ``SniffingFactory``,
    ``muxtwist.IMatcher`` for the facade's re-export) resolves when exactly
    one documented or inventoried object of that kind has that last part.
    """
    if node.get("refdomain") != "py":
        return None
    target: str = node["reftarget"]
    short = target.rsplit(".", 1)[-1] if target.startswith("muxtwist.") and target.count(".") == 1 else target
    suffix = "." + short
    domain = env.get_domain("py")
    kinds = {"class": ("class", "exception"), "exc": ("exception", "class"), "func": ("function", "method"),
             "meth": ("method",), "data": ("data", "attribute"), "attr": ("attribute", "property", "method"),
             "obj": ("class", "function", "data", "method", "attribute", "exception")}  # fmt: skip
    wanted = kinds.get(node["reftype"], ())
    local = sorted(
        (name.count("."), name)
        for name, obj in domain.objects.items()
        if name.endswith(suffix) and obj.objtype in wanted and not obj.aliased
    )
    # Several: the same object documented under the facade and its module;
    # the facade's (shortest) name is the one users import.
    if local and (len(local) == 1 or local[0][0] < local[1][0]):
        node["reftarget"] = local[0][1]
        return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], local[0][1], node, contnode)
    if local:
        return None
    from sphinx.ext import intersphinx

    found = sorted(
        {
            name
            for role, names in env.intersphinx_inventory.items()
            if role.split(":")[-1] in wanted
            for name in names
            if name.endswith(suffix)
        }
    )
    if len(found) == 1:
        node["reftarget"] = found[0]
        return intersphinx.missing_reference(app, env, node, contnode)
    return None


_VIEWCODE_BACK = re.compile(r'<a class="viewcode-back" href="([^"#]*)#([^"]+)">\[docs\]</a>')


def _fix_source_backlinks(app: Any, pagename: str, templatename: str, context: dict[str, Any], doctree: Any) -> None:
    """
    viewcode links a module's source to its objects' docs under the name of
    the module that documented them, also for objects a facade re-exports
    (``muxtwist.actions.Backend`` for ``muxtwist.proxy.Backend``) and for
    ones nobody documented. Point each link at the anchor the object really
    has, and drop the ones that have none.
    """
    if not pagename.startswith("_modules/") or "body" not in context:
        return
    anchors: dict[str, set[str]] = {}
    for obj in app.env.get_domain("py").objects.values():
        anchors.setdefault(obj.docname, set()).add(obj.node_id)

    def fix(match: re.Match[str]) -> str:
        href, anchor = match.group(1), match.group(2)
        docname = posixpath.normpath(posixpath.join(posixpath.dirname(pagename), href))
        docname = docname[: -len(".html")] if docname.endswith(".html") else docname
        known = anchors.get(docname, set())
        if anchor in known:
            return match.group(0)
        parts = anchor.split(".")
        for start in range(1, len(parts)):
            suffix = "." + ".".join(parts[start:])
            found = sorted(a for a in known if a.endswith(suffix))
            if len(found) == 1:
                return f'<a class="viewcode-back" href="{href}#{found[0]}">[docs]</a>'
        return ""

    context["body"] = _VIEWCODE_BACK.sub(fix, context["body"])


def setup(app: Any) -> dict[str, Any]:
    app.connect("html-page-context", _fix_source_backlinks)
    app.connect("missing-reference", _resolve_short_names, priority=900)
    app.connect("source-read", _fill_toctree)
    # The index's table of contents depends on which pages exist, so read it
    # again on every build, also an incremental one.
    app.connect("env-get-outdated", lambda app, env, added, changed, removed: ["index"])
    app.add_directive("interface", InterfaceDirective)
    app.add_directive("all-interfaces", AllInterfacesDirective)
    return {"parallel_read_safe": True}
