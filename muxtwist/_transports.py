"""
What muxtwist does to a Twisted transport it was handed: abort it, and shut
its writing side alone where that is safe.

Shared by the relays (:mod:`muxtwist.proxy`), TLS termination and the
asyncio adapter (:mod:`muxtwist.apps`); none of it is on a per-chunk path.
"""

from __future__ import annotations

from twisted.internet.interfaces import ISSLTransport, ITransport

__all__ = ["abort", "can_half_close", "half_close"]


def abort(transport: ITransport) -> None:
    """Abort ``transport`` at once (``abortConnection``), or close it where it cannot abort."""
    abort_connection = getattr(transport, "abortConnection", None)
    if abort_connection is not None:
        abort_connection()
    else:
        transport.loseConnection()


def can_half_close(transport: object) -> bool:
    """
    Whether ``transport`` itself can shut its writing side alone: a plain TCP
    or UNIX stream, not TLS.

    Looked up on the class, never on the instance: a TLS transport
    (``TLSMemoryBIOProtocol``, any ``ProtocolWrapper``) forwards attributes
    it lacks to the TCP transport under it, whose FIN would cut the TLS
    stream without a ``close_notify``. TLS has no half-close of its own that
    Twisted can send, and ``startTLS`` on a TCP transport marks it
    ``ISSLTransport``.
    """
    return getattr(type(transport), "loseWriteConnection", None) is not None and not ISSLTransport.providedBy(transport)


def half_close(transport: ITransport) -> bool:
    """Shut ``transport``'s writing side; ``False`` where it cannot (TLS), leaving it open."""
    if not can_half_close(transport):
        return False
    transport.loseWriteConnection()  # type: ignore[attr-defined]
    return True
