"""
TerminateTLS's per-handshake settings: session resumption only when asked
for, and certificate choice by SNI only where there is a choice to make.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from muxtwist.tls import TerminateTLS
from tests.test_tls import (
    DEADLINE,
    _read_all,
    cert_dir,
    client_context,
    http_sites,
    in_thread,
    listen,
    mux,
    pki,
    tls_get,
    write,
)


def resumed(port: int, host: str) -> bool:
    """Blocking: whether a second connection offering the first one's session resumes it."""
    ctx = client_context()
    request = b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host.encode()
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            s.sendall(request)
            _read_all(s)
            session = s.session
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw:
        with ctx.wrap_socket(raw, server_hostname=host, session=session) as s:
            s.sendall(request)
            _read_all(s)
            return s.session_reused


class ResumptionTests(TestCase):
    @defer.inlineCallbacks
    def test_no_resumption_by_default(self) -> Any:
        """By default every handshake is a full one, as with Twisted's own TLS endpoints."""
        tls = TerminateTLS(cert_dir(self, **{"a.test": pki().a}), http_sites())
        port = listen(self, mux(tls))
        self.assertFalse((yield in_thread(resumed, port, "a.test")))

    @defer.inlineCallbacks
    def test_resumption_when_asked(self) -> Any:
        """With resumption=True a returning client resumes its session."""
        tls = TerminateTLS(cert_dir(self, **{"a.test": pki().a}), http_sites(), resumption=True)
        port = listen(self, mux(tls))
        self.assertTrue((yield in_thread(resumed, port, "a.test")))


class SingleCertificateTests(TestCase):
    @defer.inlineCallbacks
    def test_one_default_serves_every_name(self) -> Any:
        """With only DEFAULT.pem, every name gets it, and the inner rules still see the SNI."""
        tls = TerminateTLS(cert_dir(self, DEFAULT=pki().default), http_sites())
        port = listen(self, mux(tls))
        for name in ("a.test", "b.test"):
            ctx = client_context()
            ctx.check_hostname = False
            result = yield in_thread(tls_get, port, name, ctx)
            self.assertEqual(result["cn"], "default.test")
        # http_sites routes by SNI: b.test reached its own Site through the default certificate.
        self.assertIn(b"site-b", result["body"])

    @defer.inlineCallbacks
    def test_names_added_while_default_breaks(self) -> Any:
        """A reload that adds a host while DEFAULT.pem is broken still chooses by SNI, keeping the old DEFAULT."""
        p = pki()
        directory = cert_dir(self, DEFAULT=p.default)
        tls = TerminateTLS(directory, http_sites())
        port = listen(self, mux(tls))
        ctx = client_context()
        ctx.check_hostname = False
        # Use the single DEFAULT context once, so it can no longer be changed.
        yield in_thread(tls_get, port, "x.test", ctx)
        write(os.path.join(directory, "a.test.pem"), p.a.cert_pem + p.a.key_pem)
        write(os.path.join(directory, "DEFAULT.pem"), b"-----BEGIN CERTIFICATE-----\nbroken\n")
        self.assertFalse(tls.reload_certificates())
        self.assertEqual(tls.hosts, ["DEFAULT", "a.test"])
        chosen = yield in_thread(tls_get, port, "a.test", client_context())
        self.assertEqual(chosen["cn"], "a.test")
        other = yield in_thread(tls_get, port, "x.test", ctx)
        self.assertEqual(other["cn"], "default.test")
