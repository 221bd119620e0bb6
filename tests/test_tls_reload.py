"""
Which ``TerminateTLS`` a reload reaches and where one counts: those its
owner's rules reach, said by the owner (a ``MuxService`` or the caller of
``reload_all_certificates``); nothing is kept in a process-wide list.
"""

from __future__ import annotations

import os

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from muxtwist.matchers import Any as AnyBytes
from muxtwist.matchers import Prefix
from muxtwist.metrics import Metrics
from muxtwist.service import MuxService
from muxtwist.sniffing import Rule, SniffingFactory
from muxtwist.tls import TerminateTLS, reload_all_certificates
from tests.test_imports import loaded_after
from tests.test_tls import Recorder, cert_dir, make_pair, pki, write

LOCAL = "tcp:0:interface=127.0.0.1"


def served(test: TestCase, service: MuxService, factory: SniffingFactory) -> None:
    """``factory`` as a listener of ``service`` (not started), stopped at cleanup."""
    service.add_listener(LOCAL, factory)
    test.addCleanup(factory.doStop)


def add_b(directory: str) -> None:
    p = pki()
    write(os.path.join(directory, "b.test.pem"), p.b.cert_pem + p.b.key_pem)


class ReloadReachesTests(TestCase):
    def test_service_reload_reloads_nested_terminators(self) -> None:
        """A MuxService reload re-reads the certificates of a TerminateTLS nested behind another and a sniffer."""
        outer_dir, inner_dir = cert_dir(self, **{"a.test": pki().a}), cert_dir(self, **{"a.test": pki().a})
        inner = TerminateTLS(inner_dir, Recorder(), reactor=Clock())
        outer = TerminateTLS(outer_dir, SniffingFactory([Rule(AnyBytes(), inner, name="in")]), reactor=Clock())
        service = MuxService(reactor=Clock(), metrics=Metrics())
        served(self, service, SniffingFactory([Rule(Prefix(b"\x16"), outer, name="tls")], reactor=Clock()))
        add_b(outer_dir)
        add_b(inner_dir)
        self.assertFalse(self.successResultOf(service.reload()))  # no rules file: certificates only
        self.assertEqual((outer.hosts, inner.hosts), (["a.test", "b.test"], ["a.test", "b.test"]))

    def test_service_reload_leaves_other_terminators_alone(self) -> None:
        """A TerminateTLS that no rule of the service reaches is not reloaded by the service's reload."""
        served_dir, other_dir = cert_dir(self, **{"a.test": pki().a}), cert_dir(self, **{"a.test": pki().a})
        mine = TerminateTLS(served_dir, Recorder(), reactor=Clock())
        other = TerminateTLS(other_dir, Recorder(), reactor=Clock())
        service = MuxService(reactor=Clock(), metrics=Metrics())
        served(self, service, SniffingFactory([Rule(AnyBytes(), mine, name="tls")], reactor=Clock()))
        add_b(served_dir)
        add_b(other_dir)
        service.reload()
        self.assertEqual((mine.hosts, other.hosts), (["a.test", "b.test"], ["a.test"]))

    def test_reload_all_certificates_reaches_what_it_is_given(self) -> None:
        """reload_all_certificates(factory) reloads the TerminateTLS given or reachable from it, and no other."""
        given_dir, other_dir = cert_dir(self, **{"a.test": pki().a}), cert_dir(self, **{"a.test": pki().a})
        given = TerminateTLS(given_dir, Recorder(), reactor=Clock())
        other = TerminateTLS(other_dir, Recorder(), reactor=Clock())
        add_b(given_dir)
        add_b(other_dir)
        reload_all_certificates(given)
        self.assertEqual((given.hosts, other.hosts), (["a.test", "b.test"], ["a.test"]))

    def test_reload_all_certificates_wants_factories(self) -> None:
        """reload_all_certificates() with nothing to look in is a TypeError, not a silent no-op."""
        with self.assertRaises(TypeError):
            reload_all_certificates()


class CountedWhereTheOwnerSaysTests(TestCase):
    def refuse_one(self, tls: TerminateTLS) -> None:
        """Two handshakes against ``max_handshakes=1``: the second is refused."""
        addr = IPv4Address("TCP", "127.0.0.1", 40000)
        self.assertIsNotNone(tls.buildProtocol(addr))
        self.assertIsNone(tls.buildProtocol(addr))

    def test_service_counts_refusals_of_terminators_its_rules_reach(self) -> None:
        """A TerminateTLS given no metrics, in the rules of a MuxService, counts its refusals into the service's."""
        metrics = Metrics()
        tls = TerminateTLS(cert_dir(self, **{"a.test": pki().a}), Recorder(), max_handshakes=1, reactor=Clock())
        service = MuxService(reactor=Clock(), metrics=metrics)
        served(self, service, SniffingFactory([Rule(AnyBytes(), tls, name="tls")], reactor=Clock()))
        self.refuse_one(tls)
        self.assertEqual(metrics.value("muxtwist_limit_rejections_total", limit="max_handshakes"), 1)

    def test_building_imports_no_metrics(self) -> None:
        """Building a TerminateTLS (and refusing a handshake) loads neither muxtwist.metrics nor prometheus_client."""
        directory = cert_dir(self, **{"a.test": pki().a})
        code = (
            "from twisted.internet.address import IPv4Address\n"
            "from twisted.internet.protocol import Factory\n"
            "from twisted.internet.task import Clock\n"
            "from muxtwist.tls import TerminateTLS\n"
            f"tls = TerminateTLS({os.path.abspath(directory)!r}, Factory(), max_handshakes=1, reactor=Clock())\n"
            "addr = IPv4Address('TCP', '127.0.0.1', 1)\n"
            "tls.buildProtocol(addr); assert tls.buildProtocol(addr) is None\n"
        )
        self.assertEqual(loaded_after(code), [])


class KeysReadOnceTests(TestCase):
    def test_a_reload_reads_no_unchanged_key_again(self) -> None:
        """Reloads, and a new TerminateTLS of the same files, check no unchanged key again; a changed key is read."""
        from cryptography.hazmat.primitives import serialization

        from muxtwist.tls import _certificates

        cache = getattr(_certificates, "_private_key", None)  # what was read before this test counts for nothing
        if cache is not None:
            cache.cache_clear()
            self.addCleanup(cache.cache_clear)
        read: list[bytes] = []
        real = serialization.load_pem_private_key

        def counted(data: bytes, password: bytes | None) -> object:
            read.append(data)
            return real(data, password)

        self.patch(serialization, "load_pem_private_key", counted)
        directory = cert_dir(self, **{"a.test": pki().a, "b.test": pki().b})
        terminator = TerminateTLS(directory, Recorder(), reactor=Clock())
        self.assertEqual(len(read), 2)
        reload_all_certificates(terminator)
        reload_all_certificates(terminator)
        TerminateTLS(directory, Recorder(), reactor=Clock())
        self.assertEqual(len(read), 2)
        changed = make_pair("b.test", ["b.test"], pki().ca)  # a new key for b.test
        write(os.path.join(directory, "b.test.pem"), changed.cert_pem + changed.key_pem)
        reload_all_certificates(terminator)
        self.assertEqual(len(read), 3)
        self.assertEqual(terminator.hosts, ["a.test", "b.test"])


class ReloadLogTests(TestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def said(self) -> list[tuple[str, str]]:
        """(level, text) of the reload's own lines (those naming the source)."""
        return [
            (e["log_level"].name, formatEvent(e))  # type: ignore[attr-defined]
            for e in self.events
            if "{source}" in str(e.get("log_format", ""))
        ]

    def test_reload_that_keeps_the_old_certificate_says_so(self) -> None:
        """A reload with broken files warns which hosts keep the old certificate and which have none."""
        directory = cert_dir(self, **{"a.test": pki().a, "b.test": pki().b})
        tls = TerminateTLS(directory, Recorder(), reactor=Clock())
        write(os.path.join(directory, "a.test.pem"), b"not a certificate")
        write(os.path.join(directory, "c.test.pem"), b"not one either")
        self.assertFalse(tls.reload_certificates())
        self.assertEqual(tls.hosts, ["a.test", "b.test"])
        self.assertEqual(
            self.said(),
            [
                (
                    "warn",
                    f"certificates from {directory} not all reloaded: the old certificate is kept for a.test; "
                    "no certificate for c.test; reloaded: b.test",
                )
            ],
        )

    def test_reload_of_good_files_says_it_reloaded(self) -> None:
        """A reload whose every file loads logs, at info, that it reloaded them, naming the hosts."""
        directory = cert_dir(self, **{"a.test": pki().a})
        tls = TerminateTLS(directory, Recorder(), reactor=Clock())
        add_b(directory)
        self.assertTrue(tls.reload_certificates())
        self.assertEqual(self.said(), [("info", f"reloaded certificates from {directory}: a.test, b.test")])
