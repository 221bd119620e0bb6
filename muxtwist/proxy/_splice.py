"""
A zero-copy relay between two TCP transports, for Linux.

Once a relay's first bytes have been handed over, the two sockets are taken
off Twisted's read and write path and read and written here, on readiness
events from the reactor's one :class:`~muxtwist.proxy._poller.Poller` (an
``epoll`` of its own for all spliced sockets, which the reactor sees as one
descriptor). Each direction starts by copying: a
``recv`` and a ``send``, which for small requests and answers costs no more
than ``splice(2)`` and needs no pipe. The first read that fills a whole
chunk shows bulk transfer; from then on that direction moves kernel-side
with ``splice(2)``, socket -> pipe -> socket, never copied into Python.

A destination that cannot take more stops reading from its source until it
is writable again, so memory stays bounded by one chunk or one pipe per
direction.

Pipes are capped process-wide (as HAProxy's ``maxpipes``): each costs two
descriptors for the life of its flow, and under load those compete with
``accept()``. :data:`pipes` counts them; a flow that would go past
:attr:`PipeBudget.limit` keeps copying with ``recv``/``send`` (asking again
on later full reads, so it moves to ``splice(2)`` once a pipe is free).
The default limit lets pipes hold at most a quarter of the process's
descriptor limit (``RLIMIT_NOFILE // 8`` pipes).

An end of file is passed on as a half-close of the other socket; when both
directions have ended, or on any socket error, the sockets are given back to
their Twisted transports to be closed, so the protocols' ``connectionLost``
runs as usual. A socket no longer read (after its end of file, or while the
other side takes nothing) stays in the poller for errors alone: its reset
ends the relay at once, as a reset found by a read does, rather than when
the relay next writes to it or the other side ends. What it had sent that
the other side has not taken yet is dropped then (it reset the connection).
"""

from __future__ import annotations

import _socket
import errno
import fcntl
import os
import socket
import sys
from typing import Any

from twisted.internet import error, tcp
from twisted.python.failure import Failure

from muxtwist._twisted import unsent_bytes
from muxtwist.proxy._poller import Poller, poller_for
from muxtwist.proxy._raw import RawTransport

__all__ = ["AVAILABLE", "PipeBudget", "Splice", "default_max_pipes", "pipes", "spliceable"]

AVAILABLE = sys.platform.startswith("linux") and hasattr(os, "splice")

_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
#: the most one recv asks for while copying; a read this full starts splicing.
_CHUNK = 65536
#: the pipe's capacity, asked for when a flow starts splicing (the kernel may
#: cap it; the most one splice call asks for).
_PIPE = 256 * 1024
#: full reads in a row before giving other connections their turn.
_ROUNDS = 16
_FAMILIES = (socket.AF_INET, socket.AF_INET6)
#: a socket's family as the kernel's number (``socket.family`` makes an enum member at each read).
_family_number = _socket.socket.family.__get__
#: what every spliced relay's clean end tells both its protocols: made once, with its
#: exception's class names worked out (Twisted's ``connectionLost`` checks them).
_DONE = Failure(error.ConnectionDone())
_DONE.parents  # noqa: B018
_GONE = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH)


def default_max_pipes() -> int:
    """Pipes that hold at most a quarter of the process's descriptor limit (at least one)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 256
    if soft == getattr(resource, "RLIM_INFINITY", -1) or soft <= 0:
        soft = 65536
    return max(1, soft // 8)


class PipeBudget:
    """
    The splice pipes open across the process, and how many may be.

    :ivar limit: the most pipes open at once.
    :ivar open: pipes open now.
    :ivar refused: flows that kept copying because the limit was reached
        (each counted once).
    """

    __slots__ = ("limit", "open", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.refused = 0

    def take(self) -> bool:
        """One pipe, if the limit allows it."""
        if self.open >= self.limit:
            return False
        self.open += 1
        return True

    def give_back(self) -> None:
        self.open -= 1


#: the process-wide pipe budget (``Proxy.set_max_pipes`` changes its limit).
pipes = PipeBudget(default_max_pipes())


def spliceable(transport: object) -> bool:
    """Whether ``transport`` is a plain, open TCP connection with nothing left to write."""
    if isinstance(transport, RawTransport):
        # A backend socket the relay owns: never the reactor's, never written to by Twisted.
        return AVAILABLE and transport.socket is not None and not transport.disconnecting
    if not AVAILABLE or not isinstance(transport, tcp.Connection):
        return False
    sock = getattr(transport, "socket", None)
    if sock is None or _family_number(sock) not in _FAMILIES or transport.disconnecting or transport.disconnected:
        return False
    # Bytes Twisted still holds for this socket would otherwise be overtaken.
    return unsent_bytes(transport) == 0 and transport.producer is None


class _Flow:
    """One direction: from ``src``'s socket through a pipe into ``dst``'s."""

    __slots__ = (
        "blocked",
        "capped",
        "dst",
        "ended",
        "in_pipe",
        "moved",
        "piped",
        "prefix",
        "read_end",
        "size",
        "src",
        "write_end",
    )

    def __init__(self, src: _End, dst: _End, prefix: bytes) -> None:
        self.src = src
        self.dst = dst
        #: the pipe, once the flow has shown bulk transfer (-1 until then).
        self.read_end = self.write_end = -1
        #: bytes spliced into the pipe and not yet out of it.
        self.in_pipe = 0
        #: bytes to send before anything from the pipe (the sniffed bytes).
        self.prefix: memoryview | None = memoryview(prefix) if prefix else None
        #: bytes delivered to ``dst``.
        self.moved = 0
        self.ended = False
        self.blocked = False
        #: whether the flow has moved to splice(2).
        self.piped = False
        #: the pipe's capacity.
        self.size = _CHUNK
        #: whether the pipe budget has refused this flow a pipe.
        self.capped = False

    def open_pipe(self) -> bool:
        """Move to ``splice(2)``; ``False`` (keep copying) past the pipe budget.

        :raises OSError: no descriptors for a pipe.
        """
        if not pipes.take():
            if not self.capped:
                self.capped = True
                pipes.refused += 1
            return False
        try:
            self.read_end, self.write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            pipes.give_back()
            raise
        self.piped = True
        try:
            # Fewer, larger splices for bulk transfer; pages are only taken as filled.
            self.size = fcntl.fcntl(self.write_end, fcntl.F_SETPIPE_SZ, _PIPE)
        except OSError:
            self.size = _CHUNK
        return True

    def close(self) -> None:
        if self.read_end < 0:
            return
        for fd in (self.read_end, self.write_end):
            os.close(fd)
        self.read_end = self.write_end = -1
        pipes.give_back()


class _End:
    """One socket of the relay, as the poller sees it while spliced."""

    __slots__ = (
        "errors",
        "events",
        "fd",
        "incoming",
        "outgoing",
        "reading",
        "socket",
        "splice",
        "transport",
        "writing",
    )

    def __init__(self, splice: Splice, transport: tcp.Connection | RawTransport) -> None:
        self.splice = splice
        self.transport = transport
        sock = transport.socket
        assert sock is not None
        self.socket: socket.socket = sock
        self.fd = self.socket.fileno()
        self.reading = False
        self.writing = False
        #: the events the poller has it registered for.
        self.events = 0
        #: neither read nor written, it stays registered to hear of a reset.
        self.errors = True
        #: the flow this socket is read for, and the one it is written for.
        self.outgoing: _Flow
        self.incoming: _Flow

    def doRead(self) -> None:
        self.splice._pump(self.outgoing)

    def doWrite(self) -> None:
        self.splice._drained(self.incoming)

    def doError(self) -> None:
        self.splice._hung_up(self)

    def connectionLost(self, reason: Failure) -> None:
        self.splice._failed(self, reason)


class Splice:
    """
    Relay ``client`` and ``backend`` with ``splice(2)`` until both directions end.

    :param first: bytes for the backend before anything read from the client.
    :ivar bytes_in: bytes delivered from the client to the backend (``first`` included).
    :ivar bytes_out: bytes delivered from the backend to the client.
    """

    # One per relay, held for the relay's life: no per-instance dict.
    __slots__ = ("_poller", "backend", "client", "closed_both", "down", "running", "up")

    def __init__(
        self, client: tcp.Connection, backend: tcp.Connection | RawTransport, first: bytes, reactor: Any
    ) -> None:
        self._poller: Poller = poller_for(reactor)
        self.client = _End(self, client)
        self.backend = _End(self, backend)
        self.up = _Flow(self.client, self.backend, first)
        self.down = _Flow(self.backend, self.client, b"")
        self.client.outgoing = self.backend.incoming = self.up
        self.backend.outgoing = self.client.incoming = self.down
        self.running = False
        #: both directions ended and both ends are being closed by the splice.
        self.closed_both = False

    @property
    def zero_copy(self) -> bool:
        """Whether either direction has moved to splice(2)."""
        return self.up.piped or self.down.piped

    @property
    def bytes_in(self) -> int:
        return self.up.moved

    @property
    def bytes_out(self) -> int:
        return self.down.moved

    def buffered(self) -> int:
        """Bytes read (or given) and not yet delivered, in either direction."""
        return sum(f.in_pipe + (len(f.prefix) if f.prefix is not None else 0) for f in (self.up, self.down))

    def start(self) -> None:
        """Take both sockets over from their transports and start relaying."""
        self.running = True
        # The transports stop writing first (they have nothing left to write:
        # spliceable()), then the splice's ends are registered: a socket the
        # poller already reads for its transport (a polled client) changes
        # hands without a system call, and its transport's stopReading then
        # finds nothing to undo.
        for end in (self.client, self.backend):
            end.transport.stopWriting()
        self._read(self.client)
        self._read(self.backend)
        for end in (self.client, self.backend):
            end.transport.stopReading()
        if self.up.prefix is not None:
            self._flush(self.up)

    def stop(self, *closing: _End) -> None:
        """
        Give the sockets back (unregistered) and close the pipes; idempotent.

        :param closing: ends whose sockets the caller closes at once: the
            close takes them out of the poller, with no system call of ours.
        """
        if not self.running:
            return
        self.running = False
        poller = self._poller
        for end in (self.client, self.backend):
            end.reading = end.writing = False
            if end in closing:
                poller.forget(end)
            else:
                poller.unregister(end)
        self.up.close()
        self.down.close()

    # Moving bytes

    def _read(self, end: _End) -> None:
        if not end.reading:
            end.reading = True
            self._poller.update(end)

    def _pump(self, flow: _Flow) -> None:
        """
        ``flow.src`` is readable: move what it has, as long as ``flow.dst``
        keeps up. Copying, one ``recv`` a call; the first full one opens the
        pipe, and the rounds go on with ``splice(2)``.
        """
        src = flow.src
        # A turn: _ROUNDS splices at the most, after the copying read that opened the pipe.
        for _ in range(_ROUNDS if flow.read_end >= 0 else _ROUNDS + 1):
            piped = flow.read_end >= 0
            try:
                if piped:
                    got = os.splice(src.fd, flow.write_end, flow.size, flags=_FLAGS)
                else:
                    data = src.socket.recv(_CHUNK)
                    got = len(data)
            except BlockingIOError:
                return
            except OSError as e:
                self._broken(src, e)
                return
            if not got:
                self._ended(flow)
                return
            if piped:
                flow.in_pipe = got
                if not self._flush(flow) or got < flow.size:
                    # Blocked, or a short read: the socket is drained for now.
                    return
                continue
            # Copying, the whole read usually goes out at once (the flow is
            # read only while nothing of it waits): a view only for a rest.
            dst = flow.dst
            try:
                sent = dst.socket.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as e:
                self._broken(dst, e)
                return
            flow.moved += sent
            if sent < got:
                flow.prefix = memoryview(data)[sent:]
                self._block(flow)
                return
            if got < _CHUNK:
                return
            try:
                if not flow.open_pipe():
                    return
            except OSError:
                # Out of descriptors: this flow keeps copying.
                return

    def _flush(self, flow: _Flow) -> bool:
        """Empty ``flow``'s pipe (and first bytes) into its destination; ``False`` if it blocked."""
        dst = flow.dst
        try:
            if flow.prefix is not None:
                sent = dst.socket.send(flow.prefix)
                flow.moved += sent
                flow.prefix = flow.prefix[sent:] if sent < len(flow.prefix) else None
                if flow.prefix is not None:
                    raise BlockingIOError
            pipe = flow.read_end
            while flow.in_pipe:
                sent = os.splice(pipe, dst.fd, flow.in_pipe, flags=_FLAGS)
                flow.in_pipe -= sent
                flow.moved += sent
        except BlockingIOError:
            self._block(flow)
            return False
        except OSError as e:
            self._broken(dst, e)
            return False
        return True

    def _block(self, flow: _Flow) -> None:
        """Stop reading the source until the destination is writable."""
        if flow.blocked:
            return
        flow.blocked = True
        src, dst = flow.src, flow.dst
        poller = self._poller
        if src.reading:
            src.reading = False
            poller.update(src)
        if not dst.writing:
            dst.writing = True
            poller.update(dst)

    def _drained(self, flow: _Flow) -> None:
        """``flow.dst`` is writable again."""
        if not self._flush(flow):
            return
        flow.blocked = False
        dst = flow.dst
        if dst.writing:
            dst.writing = False
            self._poller.update(dst)
        if not flow.ended and self.running:
            self._read(flow.src)

    # Endings

    def _ended(self, flow: _Flow) -> None:
        """End of file from ``flow.src``: half-close ``flow.dst``; close both once both ways ended."""
        flow.ended = True
        if not (self.up.ended and self.down.ended):
            src = flow.src
            if src.reading:
                # Still registered, for errors alone (unless it is written to):
                # its reset ends the relay, though the other side may never end.
                src.reading = False
                self._poller.update(src)
            try:
                flow.dst.socket.shutdown(socket.SHUT_WR)
            except OSError as e:
                self._broken(flow.dst, e)
            return
        self.closed_both = True
        self.stop(self.client, self.backend)
        # Both ways ended and nothing is buffered: close both now (the close
        # sends the last FIN), as a loseConnection would one reactor turn
        # later. Marked closing first, so the relay's own loseConnection
        # calls are no-ops.
        client, backend = self.client.transport, self.backend.transport
        client.disconnecting = backend.disconnecting = True
        # Both ways are shut: the close alone ends the connection (Twisted's
        # shutdown() before it would fail once the peer's FIN has come after ours).
        for transport in (client, backend):
            if isinstance(transport, tcp.Connection):
                transport._shouldShutdown = False
        # Both are closed whatever the client's end raises: the poller has
        # forgotten both sockets, and one left open would stay in its epoll,
        # hung up, reported at every poll to a poller that no longer knows it.
        try:
            client.connectionLost(_DONE)
        finally:
            backend.connectionLost(_DONE)

    def _broken(self, end: _End, e: OSError) -> None:
        """A socket error on ``end``: it is lost; its protocol ends the other side."""
        if e.errno in _GONE:
            reason: Exception = error.ConnectionLost(os.strerror(e.errno or 0))
        else:
            reason = e
        self._failed(end, Failure(reason))

    def _hung_up(self, end: _End) -> None:
        """
        An error or a hang-up on ``end`` while it is neither read nor
        written: a reset (or a timeout) nobody would find until the relay
        next writes to it or the other side ends. It is lost now.
        """
        try:
            code = end.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as e:
            code = e.errno or 0
        if code:
            self._broken(end, OSError(code, os.strerror(code)))
            return
        # A hang-up with no error: the peer's end of file came after this
        # side's (both ways shut) while its bytes wait for the other side.
        # A clean end, read once the other side takes them; the hang-up
        # would be reported at every poll until then, so from now on this
        # socket is polled only while it is read or written.
        end.errors = False
        self._poller.update(end)

    def _failed(self, end: _End, reason: Failure) -> None:
        if not self.running:
            return
        if self._poller.stopping:
            # The reactor is stopping: the relay ends from its client's side
            # (the backend is closed after it), and no backend is blamed.
            end = self.client
        # The lost end's connectionLost closes its socket at once.
        self.stop(end)
        end.transport.connectionLost(reason)
