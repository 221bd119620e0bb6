"""
One ``epoll`` object per reactor for every spliced socket (Linux).

A spliced relay reads and writes its two sockets itself (see
:mod:`muxtwist.proxy._splice`). Registering each socket with the reactor
would cost, per readiness event, the reactor's whole dispatch (its poll
loop, a logging context, an exception guard) and, per change of interest,
an ``epoll_ctl`` plus the reactor's bookkeeping. Instead the sockets of all
relays of one reactor sit in one :class:`Poller`, whose own descriptor is
the only one the reactor watches for them: when any of them is ready, the
reactor calls :meth:`Poller.doRead` once, which polls without waiting and
hands each ready socket straight to its :class:`Pollable`.

Each socket is in exactly one ``epoll`` at a time: a relay takes it off
its Twisted transport before registering it here, and unregisters it here
before giving it back. A backend's connect waits here too
(:mod:`muxtwist._connect`); when the relay takes the connected socket, the
relay's end replaces the connect's registration with one ``modify``.

A socket that is neither read nor written (after its end of stream, or
paused because the other side takes nothing) is taken out, unless its end
asks to hear of errors (:attr:`Pollable.errors`): it then stays registered
with no interest, for which the kernel still reports an error or a hang-up
(a reset), and :meth:`Pollable.doError` is called. The interest changes
that happen anyway carry it (a ``modify`` where there was a removal), and
an end whose socket is closed at once leaves with the close
(:meth:`Poller.forget`), not with a system call of its own: the kernel takes
a descriptor out of every ``epoll`` when its last reference is closed.
"""

from __future__ import annotations

import select
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["Pollable", "Poller", "poller_for"]

log = Logger(namespace="muxtwist.proxy")

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
#: readiness a reader is told about (a hang-up or an error is read as such).
_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
#: readiness a writer is told about.
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
#: what the kernel reports whatever the interest: the registration of an end
#: that only waits for them (non-zero, so that ``events`` says it is registered).
_ERRORS = select.EPOLLERR | select.EPOLLHUP
#: the fewest ready sockets one reactor turn may serve: a turn serves every
#: socket that is ready (up to one event per registered socket, as the
#: reactor's own ``epoll`` does for its readers), so that a turn's accepts
#: never outrun it: with a fixed cap, connects finished by the kernel waited
#: behind new clients' first bytes until their ``connect_timeout`` ran out.
MAX_EVENTS = 64


class Pollable(Protocol):
    """What a :class:`Poller` dispatches to: one socket of a relay."""

    #: the socket's descriptor, fixed for as long as it is registered.
    fd: int
    #: whether it wants readiness to read, and to write.
    reading: bool
    writing: bool
    #: the events it is registered for (0: not registered).
    events: int
    #: whether, neither read nor written, it stays registered to hear of an
    #: error or a hang-up (:meth:`doError`) rather than being taken out.
    errors: bool

    def doRead(self) -> None: ...

    def doWrite(self) -> None: ...

    def doError(self) -> None:
        """An error or a hang-up while neither read nor written (only if :attr:`errors`)."""

    def connectionLost(self, reason: Failure) -> None: ...


@implementer(IReadDescriptor)
class Poller:
    """
    The spliced sockets of one reactor, behind one descriptor the reactor reads.

    The poller is a reader of the reactor, and its ``epoll`` descriptor
    open, only while it holds a socket: a reactor with no relay running has
    nothing of ours registered or open. It holds the reactor weakly: the
    relays using it hold their reactor, and a reactor they all dropped is
    not kept alive by its poller.
    """

    __slots__ = ("__weakref__", "_ends", "_epoll", "_gone", "_reactor", "_registered", "stopping")

    def __init__(self, reactor: Any) -> None:
        # Weakly: the relays that use the poller hold the reactor, and the
        # poller kept for it (poller_for) must not keep it alive after them.
        self._reactor: weakref.ref[Any] = weakref.ref(reactor, _forget)
        self._epoll: select.epoll | None = None
        #: the socket registered for each descriptor.
        self._ends: dict[int, Pollable] = {}
        #: descriptors unregistered during the current batch (a reused number
        #: must not receive the batch's events meant for the old socket).
        self._gone: set[int] = set()
        self._registered = False
        #: whether the reactor is disconnecting everything here (see :meth:`connectionLost`).
        self.stopping = False

    def __len__(self) -> int:
        return len(self._ends)

    def update(self, end: Pollable) -> None:
        """
        Make ``end``'s registration match its ``reading`` and ``writing``.
        With neither, an end that asks to (:attr:`Pollable.errors`) stays
        registered, for errors only, if it is registered; one that is not
        is not registered for that.
        """
        events = (_IN if end.reading else 0) | (_OUT if end.writing else 0)
        old = end.events
        if not events and old and end.errors:
            events = _ERRORS
        if events == old:
            return
        fd = end.fd
        if not events:
            # Registered with no interest, a hang-up would still be reported at every poll.
            self.unregister(end)
            return
        end.events = events
        epoll = self._epoll
        if old and epoll is not None:
            epoll.modify(fd, events)
            return
        if epoll is None:
            epoll = self._epoll = select.epoll()
        held = self._ends.get(fd)
        if held is not None and held is not end and held.events:
            # The socket changes hands here (a connect's socket taken by its
            # relay, a polled client by its splice): the old end is no longer
            # registered, and a modify only if the interest changes.
            registered = held.events
            held.events = 0
            self._ends[fd] = end
            if registered != events:
                epoll.modify(fd, events)
            return
        epoll.register(fd, events)
        self._ends[fd] = end
        if not self._registered:
            self._registered = True
            reactor = self._reactor()
            if reactor is None:
                raise RuntimeError("the reactor of this poller is gone")  # a relay holds the reactor it runs on
            reactor.addReader(self)

    def unregister(self, end: Pollable) -> None:
        """Take ``end`` out (nothing if it is not in); its socket may already be closed."""
        if not end.events:
            return
        epoll = self._epoll
        if epoll is not None:
            try:
                epoll.unregister(end.fd)
            except OSError:
                # Closed already (the kernel dropped it with its last reference).
                pass
        self.forget(end)

    def forget(self, end: Pollable) -> None:
        """
        Take ``end`` out without a system call (nothing if it is not in):
        its socket is closed before anything else is registered, and the
        close takes it out of the ``epoll``. Only for a socket that nothing
        else holds open (a descriptor this process duplicated or a child
        inherited would keep it registered).
        """
        if not end.events:
            return
        end.events = 0
        fd = end.fd
        if self._ends.get(fd) is end:
            del self._ends[fd]
            self._gone.add(fd)
        epoll = self._epoll
        if not self._ends:
            if self._registered:
                self._registered = False
                reactor = self._reactor()
                if reactor is not None:  # gone: there is nothing to leave
                    reactor.removeReader(self)
            if epoll is not None:
                self._epoll = None
                epoll.close()

    # IReadDescriptor

    def fileno(self) -> int:
        return -1 if self._epoll is None else self._epoll.fileno()

    def doRead(self) -> None:
        """Serve every socket that is ready."""
        gone = self._gone
        gone.clear()
        ends = self._ends
        epoll = self._epoll
        if epoll is None:
            return
        try:
            ready = epoll.poll(0, max(MAX_EVENTS, len(ends)))
        except InterruptedError:
            return
        for fd, mask in ready:
            end = ends.get(fd)
            if end is None or fd in gone:
                continue
            try:
                if mask & _READABLE and end.reading:
                    end.doRead()
                    if ends.get(fd) is not end:
                        continue
                if mask & _WRITABLE and end.writing:
                    end.doWrite()
                elif mask & _ERRORS and end.events == _ERRORS:
                    # Registered for errors alone (maybe since the read just
                    # above): a reset of a socket nobody reads or writes.
                    end.doError()
            except Exception:
                self._lost(end, Failure())

    def _lost(self, end: Pollable, reason: Failure) -> None:
        """An end raised: that relay alone fails, as the reactor would fail its transport."""
        try:
            end.connectionLost(reason)
        except Exception:
            log.failure("a spliced relay failed while ending after {reason}", reason=reason.getErrorMessage())

    def connectionLost(self, reason: Failure) -> None:
        """
        The reactor is disconnecting everything (it is stopping): so does
        every relay here, as it would have. The ends are told in no
        particular order, with :attr:`stopping` set, so that a relay can end
        from the side it chooses rather than from whichever end comes first.
        """
        self._registered = False
        self.stopping = True
        try:
            for end in list(self._ends.values()):
                if end.events:
                    self._lost(end, reason)
        finally:
            self.stopping = False

    def logPrefix(self) -> str:
        return "muxtwist.splice"


_pollers: weakref.WeakKeyDictionary[Any, Poller] = weakref.WeakKeyDictionary()


def _nothing() -> None:
    return None


#: the last reactor asked about, weakly, and its poller (nearly always the one reactor of the process).
_last: tuple[Callable[[], Any], Poller | None] = (_nothing, None)


def _forget(gone: weakref.ref[Any]) -> None:
    """A poller's reactor is gone: the poller is not kept for it any more."""
    global _last
    if _last[0] is gone:
        _last = (_nothing, None)


def poller_for(reactor: Any) -> Poller:
    """The one :class:`Poller` of ``reactor``, kept for as long as the reactor lives."""
    global _last
    last, poller = _last
    if last() is reactor and poller is not None:
        return poller
    poller = _pollers.get(reactor)
    if poller is None:
        poller = _pollers[reactor] = Poller(reactor)
    _last = (poller._reactor, poller)
    return poller
