"""
:class:`FlowSockets`: the per-flow connected sockets of a UDP target, read
through one ``epoll`` object of their own.

The reactor watches only that ``epoll`` object, so a reactor turn costs one
Twisted dispatch however many flows have replies waiting, instead of one per
socket (each with its logging context) as with a Twisted UDP port per flow.
A dispatch polls with a zero timeout and reads at most one datagram from
each ready socket per round; level-triggered polling brings a socket with
more waiting back in the next round, so there is no read that ends in
``EAGAIN``. Rounds and events per round are bounded, so the listening
socket and timers get their turn under any load. A socket error (an ICMP
error from the backend) goes to that socket's owner only; a socket removed
while its event is still pending in the same round is skipped. Without
``epoll`` (not Linux) each socket is a reactor reader of its own.
"""

from __future__ import annotations

import select
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["EPOLL", "FlowSocket", "FlowSockets"]

log = Logger()

#: Whether this platform has ``epoll`` (Linux).
EPOLL = hasattr(select, "epoll")


class FlowSocket(Protocol):
    """What :class:`FlowSockets` needs of each socket's owner."""

    #: The socket's ``recv`` (non-blocking), called with the buffer size.
    recv: Any
    #: Called with each datagram read.
    deliver: Any

    def failed(self, error: OSError) -> None:
        """
        Reading the socket raised ``error`` (not ``EAGAIN``). Unless reading
        cleared the error (as it does a pending ICMP error), the owner removes
        the socket: one still ready is read again in the next round.
        """


@implementer(IReadDescriptor)
class FlowSockets:
    """
    Many non-blocking datagram sockets behind one reactor reader.

    :param reactor: an ``IReactorFDSet``.
    :param max_datagram: the read size (no datagram is cut short below it).
    :param max_events: the most ready sockets taken per round.
    :param max_rounds: the most rounds per reactor dispatch (without
        ``epoll``: the most datagrams read from one socket per dispatch).
    :param use_epoll: read through ``epoll`` (where there is one).
    """

    def __init__(
        self,
        reactor: IReactorFDSet,
        max_datagram: int,
        *,
        max_events: int = 64,
        max_rounds: int = 8,
        use_epoll: bool = EPOLL,
    ) -> None:
        self._reactor = reactor
        self._max_datagram = max_datagram
        self._max_events = max_events
        self._max_rounds = max_rounds
        self._use_epoll = use_epoll
        self._owners: dict[int, FlowSocket] = {}
        self._epoll: Any = None
        self._readers: dict[int, _OneSocket] = {}

    def __len__(self) -> int:
        return len(self._owners)

    def add(self, fd: int, owner: FlowSocket) -> None:
        """
        Read ``fd`` for ``owner`` from now on (the first one starts the
        reactor reading). ``OSError`` (no descriptor left for the ``epoll``
        object, or ``fd`` cannot be watched) leaves everything as it was.
        """
        if not self._use_epoll:
            self._owners[fd] = owner
            reader = self._readers[fd] = _OneSocket(fd, owner, self._max_datagram, self._max_rounds)
            self._reactor.addReader(reader)
            return
        if self._epoll is None:
            self._epoll = select.epoll()
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except OSError:
            if not self._owners:
                self._epoll.close()
                self._epoll = None
            raise
        self._owners[fd] = owner
        if len(self._owners) == 1:
            self._reactor.addReader(self)

    def remove(self, fd: int) -> None:
        """Stop reading ``fd`` (call before closing it); the last one stops the reactor reading."""
        if self._owners.pop(fd, None) is None:
            return
        if not self._use_epoll:
            reader = self._readers.pop(fd)
            reader.removed = True
            self._reactor.removeReader(reader)
            return
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # already closed: the kernel dropped it from the set
        if not self._owners:
            self._reactor.removeReader(self)
            self._epoll.close()
            self._epoll = None

    # --- IReadDescriptor ----------------------------------------------------

    def fileno(self) -> int:
        return -1 if self._epoll is None else int(self._epoll.fileno())

    def logPrefix(self) -> str:
        return "FlowSockets"

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped this reader (it is shutting down): nothing of ours to close."""

    def doRead(self) -> None:
        epoll = self._epoll
        if epoll is None:
            return
        poll = epoll.poll
        owners = self._owners
        size = self._max_datagram
        max_events = self._max_events
        for _ in range(self._max_rounds):
            events = poll(0, max_events)
            if not events:
                return
            for fd, _mask in events:
                owner = owners.get(fd)
                if owner is not None:  # else removed earlier in this round
                    _read_one(owner, size)
            if self._epoll is not epoll:
                return  # every socket was removed during the round


@implementer(IReadDescriptor)
class _OneSocket:
    """One socket as a reactor reader of its own (no ``epoll``): up to ``max_reads`` datagrams per dispatch."""

    def __init__(self, fd: int, owner: FlowSocket, max_datagram: int, max_reads: int) -> None:
        self._fd = fd
        self._owner = owner
        self._max_datagram = max_datagram
        self._max_reads = max_reads
        self.removed = False

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "FlowSockets"

    def connectionLost(self, reason: Failure) -> None:
        """The reactor dropped this reader (it is shutting down): the owner closes its socket."""

    def doRead(self) -> None:
        owner = self._owner
        for _ in range(self._max_reads):
            if self.removed or not _read_one(owner, self._max_datagram):
                return


def _read_one(owner: FlowSocket, size: int) -> bool:
    """
    Read one datagram of ``owner``'s socket and deliver it; an error goes to
    ``owner.failed``. Whether there may be more to read (a datagram came).
    Exceptions of the owner are logged, never raised to the reactor.
    """
    try:
        data = owner.recv(size)
    except BlockingIOError:
        return False
    except OSError as e:
        try:
            owner.failed(e)
        except Exception:
            log.failure("{owner!r} raised handling a socket error", owner=owner)
        return False
    try:
        owner.deliver(data)
    except Exception:
        log.failure("{owner!r} raised delivering a datagram", owner=owner)
    return True
