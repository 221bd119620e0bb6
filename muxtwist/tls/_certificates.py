"""
The certificates of a :class:`~muxtwist.tls.TerminateTLS`: PEM files named by
host, read and checked, a TLS context per host name, and the choice of one
by the client's SNI (an exact name, then a wildcard, then ``DEFAULT``).
"""

from __future__ import annotations

import functools
import os
import re
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.logger import Logger

__all__ = ["DEFAULT", "CertificateError", "Certificates", "load_certificates", "read_pair"]

log = Logger(namespace="muxtwist.tls")

#: The name, in a certificate directory or mapping, of the certificate for
#: clients that send no SNI or a name nothing else covers.
DEFAULT = "DEFAULT"


class CertificateError(ValueError):
    """A certificate file that cannot be used, and why."""


def _host_key(name: str) -> str:
    """The lookup key of a certificate name: ``_.example.com`` stands for ``*.example.com``."""
    if name == DEFAULT:
        return DEFAULT
    name = name.lower().rstrip(".")
    if name.startswith("_."):
        name = "*" + name[1:]
    return name


def _sources(certificates: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Host key -> (certificate path, key path), from a directory or a mapping."""
    found: dict[str, tuple[str, str]] = {}
    if isinstance(certificates, Mapping):
        for host, paths in certificates.items():
            if isinstance(paths, (str, os.PathLike)):
                cert_path = key_path = os.fspath(paths)
            else:
                cert_path, key_path = (os.fspath(p) for p in paths)
            found[_host_key(host)] = (cert_path, key_path)
        return found
    directory = os.fspath(certificates)
    try:
        entries = sorted(os.listdir(directory))
    except OSError as e:
        raise CertificateError(f"cannot read the certificate directory {directory}: {e.strerror}") from None
    for entry in entries:
        if entry.endswith(".pem") and not entry.startswith("."):
            path = os.path.join(directory, entry)
            found[_host_key(entry[: -len(".pem")])] = (path, path)
    return found


_PRIVATE_KEY = re.compile(rb"-----BEGIN ([A-Z ]*PRIVATE KEY)-----.+?-----END \1-----", re.DOTALL)


@functools.lru_cache(maxsize=1024)
def _private_key(pem: bytes) -> Any:
    """
    The private key in ``pem``, read once while it stays among the last
    1,024 read: checking an RSA key costs tens of milliseconds of the
    reactor's thread, and every reload reads every certificate's files
    again (twice: the running TerminateTLS, then the rules file's new one).
    A file whose key changed is read anew; one that cannot be read is tried
    again each time.
    """
    return serialization.load_pem_private_key(pem, password=None)


def read_pair(cert_path: str, key_path: str) -> tuple[list[x509.Certificate], Any]:
    """
    The certificate chain and the private key in ``cert_path`` and
    ``key_path`` (one file may hold both).

    :raises CertificateError: a file that cannot be read, or holds no
        certificate or no readable key.
    """
    try:
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        key_pem = cert_pem
        if key_path != cert_path:
            with open(key_path, "rb") as f:
                key_pem = f.read()
    except OSError as e:
        raise CertificateError(f"cannot read {e.filename}: {e.strerror}") from None
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise CertificateError(f"{cert_path}: no PEM certificate in it") from None
    block = _PRIVATE_KEY.search(key_pem)
    if block is None:
        raise CertificateError(f"{key_path}: no PEM private key in it")
    try:
        key = _private_key(block.group(0))
    except (ValueError, TypeError) as e:
        raise CertificateError(f"{key_path}: unreadable private key ({e})") from None
    return chain, key


class Certificates:
    """One loaded set of certificates: a TLS context per host name."""

    def __init__(
        self,
        contexts: dict[str, SSL.Context],
        sources: dict[str, tuple[str, str]],
        ok: bool,
        first: SSL.Context | None,
    ) -> None:
        self.contexts = contexts
        self.sources = sources
        self.ok = ok
        #: the context a connection starts with (``None``: the bare one, which chooses by SNI).
        self.first = first

    def lookup(self, server_name: str | None) -> SSL.Context | None:
        contexts = self.contexts
        if server_name:
            name = server_name.lower().rstrip(".")
            found = contexts.get(name)
            if found is not None:
                return found
            _, dot, parent = name.partition(".")
            if dot:
                found = contexts.get("*." + parent)
                if found is not None:
                    return found
        return contexts.get(DEFAULT)


def load_certificates(
    source: str | os.PathLike[str] | Mapping[str, Any],
    previous: Certificates | None,
    context_with: Callable[[str, str, bool], SSL.Context],
    choosing: weakref.WeakSet[SSL.Context],
) -> Certificates:
    """
    Read every certificate of ``source`` into a context made by
    ``context_with(certificate_path, key_path, choose)``. On a reload
    (``previous`` given) a file that is broken now keeps its old context,
    and is logged; the first load raises.

    :param choosing: the contexts that choose a certificate by SNI.
    :raises CertificateError: a broken file on the first load, or no
        certificate at all.
    """
    sources = _sources(source)
    if not sources:
        # Every handshake would fail; say so now rather than once per client.
        where = (
            "no certificate in the mapping (it is empty)"
            if isinstance(source, Mapping)
            else f"no certificate in {os.fspath(source)} (it holds no *.pem file)"
        )
        raise CertificateError(f"{where}: TerminateTLS needs at least one certificate")
    # With one certificate for every name, OpenSSL need not call back
    # into Python on each handshake to choose it.
    choose = set(sources) != {DEFAULT}
    contexts: dict[str, SSL.Context] = {}
    ok = True
    for host, (cert_path, key_path) in sources.items():
        try:
            contexts[host] = context_with(cert_path, key_path, choose)
        except CertificateError as e:
            if previous is None:
                raise
            ok = False
            old = previous.contexts.get(host)
            if old is not None:
                contexts[host] = old
                log.error("keeping the old certificate for {host}: {problem}", host=host, problem=str(e))
            else:
                log.error("no certificate for {host}: {problem}", host=host, problem=str(e))
    if previous is not None:
        for host in sorted(set(previous.contexts) - set(contexts)):
            log.info("certificate for {host} removed", host=host)
    first = contexts.get(DEFAULT)
    if first is not None and choose and first not in choosing:
        # A kept DEFAULT from a single-certificate set cannot choose by
        # SNI (a used context cannot change): start from the bare one.
        first = None
    return Certificates(contexts, sources, ok, first)
