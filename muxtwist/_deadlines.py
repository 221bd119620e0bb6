"""
Many timers of one length, kept as one ``DelayedCall``.

Every sniffing connection of a factory gets the same ``sniff_timeout``, and
every relay of a proxy the same ``connect_timeout``; nearly all of these
timers are cancelled long before they would fire. A ``DelayedCall`` each
costs an object, a push onto the reactor's heap and, once cancelled, a
removal from it. Timers that all run for the same delay expire in the order
they were started, so :class:`Deadlines` keeps them in a FIFO queue behind
one ``DelayedCall`` armed for the oldest: starting one is an append,
cancelling one forgets its callback, and the queue's ``DelayedCall`` is
cancelled as soon as no timer is live, so an idle process holds none.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["Deadline", "Deadlines"]

log = Logger()

# Reactor clocks are floats: ``now + delay`` computed twice may differ in the
# last bit, so a timer within this much of now counts as due.
_SLACK = 1e-9


class Deadline:
    """One timer of a :class:`Deadlines`: ``active()`` and ``cancel()`` as a ``DelayedCall`` has them."""

    __slots__ = ("at", "callback", "owner")

    def __init__(self, owner: Deadlines, at: float, callback: Callable[[], object]) -> None:
        self.owner = owner
        self.at = at
        self.callback: Callable[[], object] | None = callback

    def active(self) -> bool:
        """Whether it has neither fired nor been cancelled."""
        return self.callback is not None

    def cancel(self) -> None:
        """Forget the callback (a no-op once fired or cancelled)."""
        if self.callback is not None:
            self.callback = None
            self.owner._cancelled()


class Deadlines:
    """
    Timers that all fire ``delay`` seconds after they start, behind one ``DelayedCall``.

    :param reactor: the clock (``IReactorTime``).
    :param delay: seconds from :meth:`add` to the callback.
    :ivar live: timers started and neither fired nor cancelled.
    """

    def __init__(self, reactor: IReactorTime, delay: float) -> None:
        self._reactor = reactor
        self.delay = delay
        self.live = 0
        self._queue: deque[Deadline] = deque()
        self._call: IDelayedCall | None = None
        self._firing = False

    def add(self, callback: Callable[[], object]) -> Deadline:
        """Call ``callback`` in ``delay`` seconds unless the returned timer is cancelled first."""
        reactor = self._reactor
        entry = Deadline(self, reactor.seconds() + self.delay, callback)
        self._queue.append(entry)
        self.live += 1
        if self._call is None and not self._firing:
            self._call = reactor.callLater(self.delay, self._fire)
        return entry

    def _cancelled(self) -> None:
        self.live -= 1
        if not self.live:
            # Nothing left to fire: no timer held while idle.
            self._queue.clear()
            call, self._call = self._call, None
            if call is not None and call.active():
                call.cancel()

    def _fire(self) -> None:
        self._call = None
        queue = self._queue
        due = self._reactor.seconds() + _SLACK
        # Timers added by the callbacks are armed for below, after the due ones.
        self._firing = True
        try:
            while queue and queue[0].at <= due:
                entry = queue.popleft()
                callback = entry.callback
                if callback is None:
                    continue
                entry.callback = None
                self.live -= 1
                try:
                    callback()
                except Exception:
                    log.failure("timer callback {callback!r} raised", callback=callback)
        finally:
            self._firing = False
        while queue and queue[0].callback is None:
            queue.popleft()
        if queue and self._call is None:
            self._call = self._reactor.callLater(max(0.0, queue[0].at - self._reactor.seconds()), self._fire)
