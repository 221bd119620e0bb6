"""
A connection's failure in words, for log lines and counters: OpenSSL's
reasons rather than its list of tuples, what a failed TLS connection to a
backend means, and the kind of a failed connection to a backend.
"""

from __future__ import annotations

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, error
from twisted.python.failure import Failure

__all__ = ["connect_failure_kind", "connect_failure_text", "failure_text"]


def connect_failure_kind(reason: Failure) -> str:
    """How a connection to a backend failed: ``refused``, ``timeout``, ``closed``, ``tls`` or ``error``."""
    if reason.check(error.ConnectionRefusedError):
        return "refused"
    if reason.check(error.TimeoutError, error.ConnectingCancelledError, defer.CancelledError):
        return "timeout"
    if reason.check(error.ConnectionDone):
        return "closed"
    if reason.check(SSL.Error, VerificationError):
        return "tls"
    return "error"


def failure_text(reason: Failure) -> str:
    """The failure's message; for an OpenSSL error, its reasons (``"no shared cipher"``), joined by ``"; "``."""
    value = reason.value
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        return "; ".join(str(e[-1]) for e in value.args[0] if isinstance(e, (tuple, list)) and e) or str(value)
    return reason.getErrorMessage()


def connect_failure_text(reason: Failure) -> str:
    """
    :func:`failure_text` of a failed connection to a backend, saying first
    what a TLS failure means: the certificate does not match the backend's
    name, failed verification, or the handshake failed.
    """
    if reason.check(VerificationError):
        return f"TLS certificate does not match the backend's name ({reason.value})"
    text = failure_text(reason)
    if reason.check(SSL.Error):
        if "certificate verify failed" in text:
            return f"TLS certificate verification failed ({text})"
        return f"TLS handshake failed ({text})"
    return text
