"""
The shape of muxtwist's imports: matchers and facades import light, and the
modules of ``muxtwist/`` import each other without cycles.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from twisted.trial import unittest

import muxtwist

PACKAGE = Path(muxtwist.__file__).resolve().parent

#: What a user who imports only a matcher or a facade must not pay for.
HEAVY = ("prometheus_client", "twisted.application", "twisted.internet.reactor")

#: Function-level imports of muxtwist modules allowed inside the sniffer and
#: the proxy (imports that would dodge a cycle or sit in per-connection code):
#: none since the split of issue 16; the sniffer is given its observer.
SPLIT_FUNCTION_IMPORTS: frozenset[tuple[str, str]] = frozenset()


def _python(code: str) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter and return the JSON it prints last."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, env=env
    ).stdout
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def loaded_after(code: str, modules: tuple[str, ...] = ("muxtwist.metrics", "prometheus_client")) -> object:
    """Which of ``modules`` a fresh interpreter has loaded once it has run ``code`` (by default, the metrics code)."""
    return _python(
        f"{code}\nimport json, sys\nprint(json.dumps({{'loaded': [m for m in {modules!r} if m in sys.modules]}}))"
    )["loaded"]


def _heavy_after_import(module: str) -> dict[str, object]:
    return _python(
        "import json, sys\n"
        f"import {module}\n"
        f"print(json.dumps({{'heavy': [m for m in {HEAVY!r} if m in sys.modules], 'count': len(sys.modules)}}))"
    )


# The import graph, read with ast: nothing is imported to draw it.


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    """Every import statement with (in a function, under TYPE_CHECKING)."""

    def walk(
        node: ast.AST, in_function: bool, typing_only: bool
    ) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, in_function, typing_only
            elif isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), in_function, True)
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), in_function, typing_only)
            else:
                function = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                yield from walk(child, in_function or function, typing_only)

    yield from walk(tree, False, False)


def _lazy_map(tree: ast.Module) -> dict[str, str]:
    """A facade's ``_LAZY = {name: module}`` (see muxtwist._lazy)."""
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in stmt.targets):
            value = ast.literal_eval(stmt.value)
            assert isinstance(value, dict)
            return value
    return {}


class Edge:
    def __init__(self, source: str, target: str, line: int, in_function: bool, typing_only: bool) -> None:
        self.source, self.target, self.line = source, target, line
        self.in_function, self.typing_only = in_function, typing_only

    def __repr__(self) -> str:
        how = "function-level" if self.in_function else "module-level"
        how += ", TYPE_CHECKING" if self.typing_only else ""
        return f"{self.source} -> {self.target} (line {self.line}, {how})"


def import_edges(root: Path) -> list[Edge]:
    """
    The imports between the modules of the package at ``root``: module-level
    and function-level, and those under ``if TYPE_CHECKING:`` (marked).
    ``from pkg import Name`` where ``pkg`` is a lazy facade counts as an
    import of the module that defines ``Name``.
    """
    paths = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in paths.items()}
    lazy = {name: _lazy_map(tree) for name, tree in trees.items()}
    edges = []
    for name, tree in trees.items():
        package = name if paths[name].name == "__init__.py" else name.rpartition(".")[0]
        for node, in_function, typing_only in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    if submodule in paths:
                        targets.append(submodule)
                    else:
                        targets.append(lazy.get(base, {}).get(alias.name, base))
            for target in targets:
                if target in paths and target != name:
                    edges.append(Edge(name, target, node.lineno, in_function, typing_only))
    return edges


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """For each strongly connected group of modules, the edges inside it."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [[e for e in edges if e.source in g and e.target in g] for g in groups]


class LightImportTests(unittest.TestCase):
    def test_matcher_modules_import_light(self) -> None:
        """muxtwist.matchers and each matcher module import no prometheus_client, twisted.application or reactor."""
        names = sorted(p.stem for p in (PACKAGE / "matchers").glob("*.py") if p.stem != "__init__")
        modules = ["muxtwist.matchers", *(f"muxtwist.matchers.{n}" for n in names)]
        heavy = {m: found for m in modules if (found := _heavy_after_import(m)["heavy"])}
        self.assertEqual(heavy, {})

    def test_facades_import_light(self) -> None:
        """import muxtwist, muxtwist.interfaces and muxtwist.actions load nothing heavy until a heavy name is used."""
        heavy = {
            m: found
            for m in ("muxtwist", "muxtwist.interfaces", "muxtwist.actions")
            if (found := _heavy_after_import(m)["heavy"])
        }
        self.assertEqual(heavy, {})

    def test_lazy_names_load_on_use(self) -> None:
        """Reading a lazy facade name imports its module and gives the very object it defines."""
        result = _python(
            "import json, sys, muxtwist\n"
            "before = 'muxtwist.service' in sys.modules\n"
            "from muxtwist import MuxService\n"
            "from muxtwist.service import MuxService as defined\n"
            "print(json.dumps({'before': before, 'same': MuxService is defined,"
            " 'after': 'twisted.application' in sys.modules}))"
        )
        self.assertEqual(result, {"before": False, "same": True, "after": True})

    def test_facades_list_their_names(self) -> None:
        """Every lazy name is in its facade's __all__ and dir(), and resolves to its defining module's object."""
        for facade in ("muxtwist", "muxtwist.matchers", "muxtwist.actions"):
            module = importlib.import_module(facade)
            for name, where in module._LAZY.items():
                self.assertIn(name, module.__all__, f"{facade}.{name}")
                self.assertIn(name, dir(module), f"{facade}.{name}")
                self.assertIs(getattr(module, name), getattr(importlib.import_module(where), name))

    def test_unknown_facade_name(self) -> None:
        """A name a facade does not have is an AttributeError naming the facade."""
        import muxtwist.matchers

        with self.assertRaises(AttributeError) as caught:
            muxtwist.matchers.NoSuchMatcher  # noqa: B018
        self.assertIn("muxtwist.matchers", str(caught.exception))


class CycleTests(unittest.TestCase):
    def test_no_import_cycles(self) -> None:
        """The modules of muxtwist/ import each other (at module or function level) without a cycle."""
        runtime = [e for e in import_edges(PACKAGE) if not e.typing_only]
        self.assertEqual(cycles(runtime), [])

    def test_no_type_level_cycles(self) -> None:
        """Counting the imports under TYPE_CHECKING too, the modules of muxtwist/ import each other without a cycle."""
        self.assertEqual(cycles(import_edges(PACKAGE)), [])

    def test_function_imports_of_sniffer_and_proxy(self) -> None:
        """The sniffer and the proxy import muxtwist modules inside functions only where the split is to remove it."""
        found = {
            (e.source, e.target)
            for e in import_edges(PACKAGE)
            if e.in_function and not e.typing_only and e.source in ("muxtwist.sniffing", "muxtwist.proxy")
        }
        self.assertEqual(found - SPLIT_FUNCTION_IMPORTS, set())

    def test_walker_sees_every_kind_of_cycle(self) -> None:
        """The walker finds a cycle closed by a function-level import and one closed through a lazy facade."""
        root = Path(self.mktemp()) / "pkg"
        root.mkdir(parents=True)
        (root / "__init__.py").write_text("_LAZY = {'Thing': 'pkg.c'}\n")
        (root / "a.py").write_text("import pkg.b\n")
        (root / "b.py").write_text("def f():\n    from pkg import a\n")
        (root / "c.py").write_text("from pkg.d import x\n")
        (root / "d.py").write_text(
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.e\nfrom pkg import Thing\n"
        )
        (root / "e.py").write_text("from . import d\n")
        groups = cycles([e for e in import_edges(root) if not e.typing_only])
        self.assertEqual(
            sorted(sorted({e.source for e in g}) for g in groups), [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d"]]
        )
        with_types = cycles(import_edges(root))
        self.assertIn(["pkg.c", "pkg.d", "pkg.e"], sorted(sorted({e.source for e in g}) for g in with_types))
