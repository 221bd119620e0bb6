"""
What the in-process HTTP targets (``WSGI``, ``ASGI``) share: about slow
request heads, how long one may take once the target is asked to finish,
the timer of ``header_timeout`` (:class:`HeadDeadline`) and the answer to
a head that took longer; and the call each makes at the reactor's shutdown
(:class:`ShutdownTrigger`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall

__all__ = ["PARTIAL_REQUEST_GRACE", "REQUEST_TIMEOUT_RESPONSE", "HeadDeadline", "ShutdownTrigger"]

#: seconds without a byte after which a request whose headers are still
#: coming is given up once its target was asked to finish (a reload, a
#: stop): the protocols have no timer of their own then.
PARTIAL_REQUEST_GRACE = 10.0

#: What a client whose request's head did not come in full within
#: ``header_timeout`` seconds of its first byte gets, before the close.
REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 16\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"Request Timeout\n"
)


class HeadDeadline:
    """
    The ``header_timeout`` timer of the request head a connection is
    receiving. Its connection starts it when a read leaves part of a head
    (a head that came whole in one read costs one look) and stops it when
    the head has come in full or the connection ends; the bytes in between
    do not reset it (a total, as HAProxy's ``timeout http-request``).
    """

    def __init__(self) -> None:
        self._call: IDelayedCall | None = None

    def start(
        self,
        call_later: Callable[[float, Callable[[], None]], IDelayedCall],
        timeout: float,
        timed_out: Callable[[], None],
    ) -> None:
        """``timed_out`` in ``timeout`` seconds, unless the timer runs already (its own callback may start it again)."""
        if self._call is None or not self._call.active():
            self._call = call_later(timeout, timed_out)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class ShutdownTrigger:
    """
    A target's ``call`` at the reactor's shutdown (a ``before shutdown``
    system event trigger), added when the target starts and removed when it
    stops, so that a stopped target is not called then.
    """

    def __init__(self, call: Callable[[], object]) -> None:
        self._call = call
        self._added: tuple[Any, object] | None = None

    def add(self, reactor: Any) -> None:
        """Add it to ``reactor``, unless it is added already."""
        if self._added is None:
            self._added = (reactor, reactor.addSystemEventTrigger("before", "shutdown", self._call))

    def remove(self) -> None:
        """Remove it, if it is added (one the reactor's shutdown has run already is no error)."""
        if self._added is not None:
            reactor, trigger = self._added
            try:
                reactor.removeSystemEventTrigger(trigger)
            except (ValueError, KeyError):
                pass
            self._added = None
