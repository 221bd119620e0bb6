"""
The sniffer's modules: each one concern small enough to read in one
sitting, no imports inside per-connection code, and ``muxtwist.sniffing``
still naming everything it did before it was split.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial import unittest

import muxtwist
import muxtwist.sniffing
from muxtwist.matchers import Any as AnyMatcher

PACKAGE = Path(muxtwist.__file__).resolve().parent

#: The sniffer, its factory and the parts of a connection.
SNIFFER_MODULES = (
    "sniffing.py",
    "_sniffing_protocol.py",
    "_sniffing_end.py",
    "_prestage.py",
    "_limits.py",
    "_inner.py",
    "_rules.py",
    "_report.py",
    "_deadlines.py",
)

#: What ``muxtwist.sniffing`` defined or imported for users before the split.
PUBLIC = (
    "EAGER_BYTES",
    "EAGER_EVALUATIONS",
    "QUIET_BUDGET",
    "QUIET_DELAY",
    "RESERVED_NAMES",
    "Outcome",
    "Rule",
    "RuleStats",
    "SniffingFactory",
    "SniffingProtocol",
    "check_unique_names",
    "duplicate_names",
    "max_matcher_work",
)


class LayoutTests(unittest.TestCase):
    def test_no_sniffer_module_over_500_lines(self) -> None:
        """Each module of the sniffer has at most 500 lines."""
        sizes = {name: len((PACKAGE / name).read_text().splitlines()) for name in SNIFFER_MODULES}
        self.assertEqual({name: n for name, n in sizes.items() if n > 500}, {})

    def test_no_imports_inside_functions(self) -> None:
        """No module of the sniffer imports anything inside a function (per-connection code imports nothing)."""
        found = []
        for name in SNIFFER_MODULES:
            tree = ast.parse((PACKAGE / name).read_text())
            for function in ast.walk(tree):
                if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                    found += [
                        f"{name}:{node.lineno}"
                        for node in ast.walk(function)
                        if isinstance(node, ast.Import | ast.ImportFrom)
                    ]
        self.assertEqual(found, [])

    def test_public_names_unchanged(self) -> None:
        """muxtwist.sniffing names every public name it had before the split, in __all__."""
        for name in PUBLIC:
            self.assertTrue(hasattr(muxtwist.sniffing, name), name)
            self.assertIn(name, muxtwist.sniffing.__all__)
        self.assertEqual(muxtwist.sniffing.SniffingProtocol.__module__, "muxtwist.sniffing")

    def test_connection_has_no_instance_dict(self) -> None:
        """A sniffed connection, built in layers, keeps every field in slots: no per-connection dict."""
        factory = muxtwist.sniffing.SniffingFactory(
            [muxtwist.sniffing.Rule(AnyMatcher(), Factory.forProtocol(Protocol))], reactor=Clock()
        )
        sniffer = factory.buildProtocol(None)  # type: ignore[arg-type]
        self.assertFalse(hasattr(sniffer, "__dict__"))
