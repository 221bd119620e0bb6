"""
Connecting to a TCP backend on a socket the caller owns from the start.

``reactor.connectTCP``, under every ``tcp:`` client endpoint, builds a
connector, a client transport before the socket connects, a zero-delay
``DelayedCall`` to start resolving, a Deferred for the resolution of an
address that needs none, and a wrapping factory and protocol for the
endpoint's Deferred. For a backend given by IP address none of that is
needed: :func:`connect_socket` starts a non-blocking ``connect`` on a socket
it is given, waits for it to be writable, and hands the connected socket to
the reactor with ``adoptStreamConnection`` (a public ``IReactorSocket``
method), so the protocol gets an ordinary TCP transport. A factory with a
``take_socket(sock)`` method is asked first: when it returns a protocol, it
has taken the connected socket as it is (a spliced relay's backend, see
:mod:`muxtwist.proxy._raw`) and nothing is adopted.

:func:`direct_endpoint` gives the endpoint for a ``tcp:`` description
where this path applies (Linux, a POSIX reactor, ``host`` an IP address,
nothing but ``host`` and ``port`` given), and ``None`` elsewhere, where
Twisted's portable endpoint stays. The transparent proxy
(:mod:`muxtwist.transparent`) connects with :func:`connect_socket` too, on a
socket bound to the client's address.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer, error
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from muxtwist._descriptions import split_description

__all__ = ["DirectTCPEndpoint", "connect_error", "connect_socket", "direct_endpoint", "finished_connect"]


class _Poller(Protocol):
    """What a connect registers with when its factory names a poller (see :mod:`muxtwist.proxy._poller`)."""

    def update(self, end: Any) -> None: ...

    def unregister(self, end: Any) -> None: ...


class _PendingConnect:
    """
    An ``IWriteDescriptor`` waiting for one non-blocking connect to finish:
    a writer of the reactor, or of the poller its factory names
    (``connect_poller``), which the socket then stays in if the factory
    takes it as it is.
    """

    __slots__ = ("_d", "_factory", "_poller", "_reactor", "_sock", "events", "fd", "reading", "writing")

    def __init__(
        self, reactor: Any, sock: socket.socket, factory: IProtocolFactory, d: defer.Deferred[IProtocol]
    ) -> None:
        self._reactor = reactor
        self._sock: socket.socket | None = sock
        self._factory = factory
        self._d = d
        self._poller: _Poller | None = getattr(factory, "connect_poller", None)
        if hasattr(factory, "connecting"):
            # The factory keeps the connect it waits for (see finished_connect).
            factory.connecting = self
        # As a poller's end: its descriptor, its interest, its registration.
        self.fd = sock.fileno()
        self.reading = False
        self.writing = False
        self.events = 0

    #: as a poller's end, never registered for errors alone (see muxtwist.proxy._poller).
    errors = False

    def watch(self) -> None:
        """Wait for the socket to be writable (its connect done)."""
        self.writing = True
        if self._poller is None:
            self._reactor.addWriter(self)
        else:
            self._poller.update(self)

    def _unwatch(self) -> None:
        """Stop waiting (idempotent; nothing if a taker's registration replaced ours)."""
        factory: Any = self._factory
        if getattr(factory, "connecting", None) is self:
            # Over: the factory no longer keeps it (nor a cycle with it).
            factory.connecting = None
        if not self.writing:
            return
        self.writing = False
        if self._poller is None:
            self._reactor.removeWriter(self)
        else:
            self._poller.unregister(self)

    def doRead(self) -> None:
        pass

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def logPrefix(self) -> str:
        return "muxtwist-connect"

    def doWrite(self) -> None:
        sock = self._sock
        if sock is None:
            return
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._unwatch()
            self._close()
            self._d.errback(connect_error(code))
            return
        take = getattr(self._factory, "take_socket", None)
        if take is not None:
            if self._poller is None:
                self._unwatch()
            # Else still registered: the taker's registration in the same poller replaces ours.
            try:
                taken = take(sock)
            except Exception:
                self._unwatch()
                self._close()
                self._d.errback(Failure())
                return
            if taken is not None:
                # The factory's protocol owns the socket now, without a Twisted transport.
                self._unwatch()
                self._sock = None
                self._d.callback(taken)
                return
        self._unwatch()
        built: list[IProtocol] = []
        try:
            self._reactor.adoptStreamConnection(sock.fileno(), sock.family, _Capture(self._factory, built))
        except Exception:
            self._close()
            self._d.errback(Failure())
            return
        # The reactor holds its own duplicate of the descriptor now.
        self._close()
        if built:
            self._d.callback(built[0])
        else:
            self._d.errback(error.ConnectError(string="the factory built no protocol"))

    def connectionLost(self, reason: Failure) -> None:
        # The reactor saw an error or hang-up on the socket (a refused
        # connect, with epoll) and dropped it without calling doWrite.
        sock = self._sock
        if sock is None:
            return
        self._unwatch()
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._close()
        self._d.errback(connect_error(code) if code else reason)

    def finish_if_connected(self) -> bool:
        """
        If the kernel has finished the connect and this process has not yet
        looked (it was busy), finish it now, as if the socket had been seen
        writable, and say ``True``; ``False`` if it is still in progress,
        failed, or is over already.
        """
        sock = self._sock
        if sock is None or not self.writing:
            return False
        try:
            sock.getpeername()
        except OSError:
            return False
        self.doWrite()
        return True

    def cancel(self, d: defer.Deferred[IProtocol]) -> None:
        if self._sock is not None:
            self._unwatch()
            self._close()

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def finished_connect(factory: object) -> bool:
    """
    Finish the connect ``factory`` waits for if the kernel has finished it
    (:meth:`_PendingConnect.finish_if_connected`): for a connect deadline
    that fires after the process was too busy to see the socket writable.
    ``factory`` must have a ``connecting`` attribute for its connects to be
    known; ``False`` for any other.
    """
    pending = getattr(factory, "connecting", None)
    return isinstance(pending, _PendingConnect) and pending.finish_if_connected()


def connect_error(code: int) -> Exception:
    """The Twisted connect error for an ``errno`` from ``connect``."""
    if code == errno.ECONNREFUSED:
        return error.ConnectionRefusedError()
    if code == errno.ETIMEDOUT:
        return error.TCPTimedOutError()
    return error.ConnectError(osError=code, string=errno.errorcode.get(code, str(code)))


@implementer(IProtocolFactory)
class _Capture:
    """Passes ``buildProtocol`` on to the real factory and keeps what it built."""

    __slots__ = ("_built", "_factory")

    def __init__(self, factory: IProtocolFactory, built: list[IProtocol]) -> None:
        self._factory = factory
        self._built = built

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        p = self._factory.buildProtocol(addr)
        if p is not None:
            self._built.append(p)
        return p

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


def connect_socket(
    reactor: Any,
    sock: socket.socket,
    address: tuple[Any, ...],
    factory: IProtocolFactory,
    busy: Callable[[], socket.socket] | None = None,
) -> defer.Deferred[IProtocol]:
    """
    Connect the non-blocking, unconnected ``sock`` to ``address``; once
    connected, the reactor adopts it and ``factory`` builds its protocol.

    The Deferred fires with that protocol (after its ``connectionMade``),
    fails with the connect error, and cancelling it closes the socket.
    ``sock`` belongs to this call from now on, whatever happens.

    :param reactor: an ``IReactorFDSet`` and ``IReactorSocket``.
    :param busy: when ``connect`` says the connection from ``sock``'s bound
        address and port to ``address`` exists already (``EADDRNOTAVAIL``),
        called once for another socket to try instead.
    """
    pending: _PendingConnect
    d: defer.Deferred[IProtocol] = defer.Deferred(lambda d: pending.cancel(d))
    pending = _PendingConnect(reactor, sock, factory, d)
    code = _start(sock, address)
    if code in (errno.EADDRNOTAVAIL, errno.EADDRINUSE) and busy is not None:
        pending._close()
        try:
            sock = busy()
        except OSError as e:
            return defer.fail(error.ConnectBindError(e.errno, e.strerror))
        pending = _PendingConnect(reactor, sock, factory, d)
        code = _start(sock, address)
    if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
        pending._close()
        return defer.fail(connect_error(code))
    # Even a connect that is done at once is finished by doWrite: the socket is writable.
    pending.watch()
    return d


def _start(sock: socket.socket, address: tuple[Any, ...]) -> int:
    """Start a non-blocking ``connect``; its ``errno`` (0, ``EINPROGRESS`` or the failure)."""
    try:
        return sock.connect_ex(address)
    except OSError as e:
        return e.errno or errno.EINVAL


@implementer(IStreamClientEndpoint)
class DirectTCPEndpoint:
    """
    A TCP client endpoint for a backend given by IP address, with
    :func:`connect_socket`: the protocol's transport is the reactor's
    ordinary TCP transport, without ``connectTCP``'s connector, resolution
    and wrapping on the way.
    """

    def __init__(self, reactor: Any, host: str, port: int) -> None:
        self._reactor = reactor
        self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._address = (host, port)

    def __repr__(self) -> str:
        return f"<DirectTCPEndpoint {self._address[0]}:{self._address[1]}>"

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        try:
            # Non-blocking from its creation (Linux): no second system call to make it so.
            sock = socket.socket(self._family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:
            return defer.fail(error.ConnectBindError(e.errno, e.strerror))
        return connect_socket(self._reactor, sock, self._address, protocolFactory)


def _host_port(description: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``tcp:``/``tcp6:`` description naming only those, or ``None``."""
    positional, named = split_description(description)
    kind, positional = positional[0], positional[1:]
    if kind not in ("tcp", "tcp6"):
        return None
    for name, value in zip(("host", "port"), positional, strict=False):
        if name in named:
            return None
        named[name] = value
    if len(positional) > 2 or set(named) != {"host", "port"}:
        return None
    host, port = named["host"], named["port"]
    try:
        parsed = ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        return None
    if "%" in host or not 0 < number < 65536 or (kind == "tcp6") != (parsed.version == 6):
        return None
    return host, number


def direct_endpoint(reactor: Any, description: str) -> DirectTCPEndpoint | None:
    """
    The :class:`DirectTCPEndpoint` for ``description``, or ``None`` where
    Twisted's portable endpoint stays: not Linux, not a POSIX reactor (the
    asyncio one is one), not ``tcp:`` with an IP address and port and
    nothing else (a host name to resolve, ``bindAddress``, ``timeout``).
    """
    from twisted.internet.posixbase import PosixReactorBase

    if not sys.platform.startswith("linux") or not isinstance(reactor, PosixReactorBase):
        return None
    found = _host_port(description)
    if found is None:
        return None
    return DirectTCPEndpoint(reactor, *found)
