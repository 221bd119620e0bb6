"""
The service, the admin site and metrics import what they use at module
level: no import inside a function dodges a cycle or defers a dependency.
"""

from __future__ import annotations

from twisted.trial import unittest

from tests.test_imports import PACKAGE, import_edges

#: The reporting side of the house: what serves, counts and shows connections.
REPORTING = ("muxtwist.service", "muxtwist.admin", "muxtwist.metrics")


class ReportingImportTests(unittest.TestCase):
    def test_no_function_level_imports(self) -> None:
        """MuxService, the admin modules and metrics import no muxtwist module inside a function."""
        found = [
            e
            for e in import_edges(PACKAGE)
            if e.in_function and not e.typing_only and (e.source in REPORTING or e.source.startswith("muxtwist._admin"))
        ]
        self.assertEqual(found, [])

    def test_service_imports_admin_one_way(self) -> None:
        """The service imports the admin site; no admin or metrics module imports the service back."""
        edges = [e for e in import_edges(PACKAGE) if not e.typing_only]
        self.assertIn(("muxtwist.service", "muxtwist.admin"), {(e.source, e.target) for e in edges})
        back = [
            e
            for e in edges
            if e.target in ("muxtwist.service", "muxtwist.workers")
            and (e.source in REPORTING or e.source.startswith("muxtwist._admin"))
        ]
        self.assertEqual(back, [])
