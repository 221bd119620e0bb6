"""``muxtwist.doctor`` reads backends' descriptions the way Twisted does, and imports no metrics code."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

from twisted.trial import unittest

from muxtwist.doctor import _backend_hosts
from tests.test_imports import loaded_after


def proxy(*descriptions: str) -> SimpleNamespace:
    return SimpleNamespace(backends=[SimpleNamespace(description=d) for d in descriptions])


class BackendHostTests(unittest.SynchronousTestCase):
    def test_hosts_read_as_twisted_reads_them(self) -> None:
        """A backend's host is its host= parameter as Twisted splits the description (escapes, last one given)."""
        hosts = _backend_hosts(
            proxy(
                "tcp:host=127.0.0.1:port=22",
                "tcp:host=\\:\\:1:port=80",
                "tcp:port=80:bindAddress=10.9.9.9\\:host=10.9.9.8:host=10.0.0.7",
                "tcp:host=10.0.0.1:port=81:host=10.0.0.2",
                "tcp:host=backend.example:port=80",
                "unix:path=/run/host=10.0.0.9",
            )
        )
        expected = ["127.0.0.1", "::1", "10.0.0.7", "10.0.0.2"]
        self.assertEqual(hosts, [ipaddress.ip_address(h) for h in expected])

    def test_doctor_imports_no_metrics(self) -> None:
        """Importing muxtwist.doctor and finding transparent proxies loads no prometheus_client."""
        code = "from muxtwist.doctor import transparent_proxies\nlist(transparent_proxies([]))"
        self.assertEqual(loaded_after(code), [])
