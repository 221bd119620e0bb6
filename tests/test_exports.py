"""
The public facade: the names users import, as DESIGN.md lists them.
"""

from __future__ import annotations

import importlib

from twisted.trial import unittest

PUBLIC = {
    "muxtwist": ["SniffingFactory", "Rule", "Verdict", "MuxService", "ConnectionInfo", "IMatcher", "IMatcherPlugin"],
    "muxtwist.interfaces": ["IMatcher", "IMatcherPlugin", "ConnectionInfo", "Verdict", "IRespondingMatcher"],
    "muxtwist.matchers": [
        *("Any", "Prefix", "Regex", "RemoteAddress", "AnyOf", "AllOf", "Not", "HTTP1", "plugin"),
        *("QUIC", "DNS", "WireGuard", "DTLS", "STUN"),
    ],
    "muxtwist.actions": ["Reject", "UDPProxy"],
    "muxtwist.testing": ["route", "MemoryConnection"],
    "muxtwist.apps": ["ASGI", "WSGI", "AsyncioProtocol", "AsyncioReactorRequired"],
    "muxtwist.aio": ["serve", "Server", "install_reactor", "AsyncioReactorRequired"],
}


class ExportTests(unittest.TestCase):
    def test_public_names(self) -> None:
        """Every public name is importable from its module and listed in __all__."""
        for module_name, names in PUBLIC.items():
            module = importlib.import_module(module_name)
            for name in names:
                self.assertTrue(hasattr(module, name), f"{module_name}.{name}")
                self.assertIn(name, module.__all__, f"{module_name}.__all__ lacks {name}")

    def test_all_is_importable(self) -> None:
        """Everything in each __all__ exists."""
        for module_name in PUBLIC:
            module = importlib.import_module(module_name)
            for name in module.__all__:
                self.assertTrue(hasattr(module, name), f"{module_name}.{name}")
