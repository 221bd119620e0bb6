"""
The places where muxtwist reads or sets private attributes of Twisted's
objects, one helper each, and the default-reactor lookup.

Each helper says why Twisted offers no public way and on which Twisted
versions the attribute was checked. ``tests/test_twisted_private.py`` builds
real Twisted objects and fails, naming the helper, as soon as a Twisted
release renames or changes one of them: the fix then belongs here alone.

Checked on: Twisted 26.10.0.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    # Types only: this module is imported by light modules (no twisted.application).
    from twisted.application.internet import StreamServerEndpointService
    from twisted.internet import defer
    from twisted.internet.interfaces import IStreamServerEndpoint
    from twisted.python.failure import Failure

__all__ = [
    "after_connection_lost",
    "asyncio_loop_of",
    "default_reactor",
    "endpoint_backlog",
    "endpoint_port",
    "generic_http_channel_base",
    "http_channel_busy",
    "http_head_coming",
    "http_inner_channel",
    "listen_errors_raise",
    "listening",
    "reactor_started",
    "remove_twistd_pidfile",
    "set_port_log_observer",
    "take_exit_signal",
    "tell_twistd_parent",
    "tls_unsent_bytes",
    "unsent_bytes",
    "was_aborted",
    "write_now",
]


def default_reactor(reactor: Any) -> Any:
    """
    ``reactor``, or the global one when it is ``None``.

    Importing ``twisted.internet.reactor`` installs the default reactor, so it
    is done only here, when a caller did not pass one (tests pass a ``Clock``
    or ``MemoryReactorClock``; embedders pass theirs).
    """
    if reactor is None:
        from twisted.internet import reactor as installed

        return installed
    return reactor


def unsent_bytes(transport: object) -> int | None:
    """
    Bytes a Twisted ``FileDescriptor`` transport (TCP, UNIX) holds and has not
    yet written to its socket; ``None`` for a transport that is not one.

    Why private: ``FileDescriptor`` keeps its write buffer as ``dataBuffer``
    (bytes, of which ``offset`` are already written) plus ``_tempDataLen``
    bytes queued in ``_tempDataBuffer``; the only public view is
    ``IProducer``-style pausing at ``bufferSize``, which says "more than
    64 KiB", not "how many" or "none". The relays need "none" before they
    move data under Twisted (splice) and the count for backpressure.
    Checked on Twisted 26.10.0 (``twisted.internet.abstract.FileDescriptor``).
    """
    buffered = getattr(transport, "dataBuffer", None)
    if not isinstance(buffered, bytes):
        return None
    held: Any = transport
    return len(buffered) - int(held.offset) + int(held._tempDataLen)


def write_now(transport: Any, data: bytes) -> None:
    """
    ``transport.write(data)``, except that a plain TCP or UNIX transport with
    nothing waiting to be sent hands the bytes to its socket at once, as
    asyncio's own transports do; what the socket does not take is written
    the usual way, after it.

    Why: ``FileDescriptor.write`` only queues; the bytes go out on the
    reactor's next turn, after it registered the socket for writing and
    before it unregisters it again: two ``epoll_ctl`` calls, a poll and a
    dispatch for every answer (about a sixth of an in-process ASGI request's
    CPU). Private: "nothing waiting" is :func:`unsent_bytes`, and the socket
    is Twisted's ``socket`` attribute, which must never be written to under
    a TLS layer: Twisted's TCP connections have a ``TLS`` flag, False on
    their class and set True on the instance by ``startTLS``; other
    transports (a ``TLSMemoryBIOProtocol`` above TCP) have none on theirs.
    Checked on Twisted 26.10.0 (``twisted.internet.tcp``).
    """
    # The class's flag, not only the instance's: a TLS layer such as
    # TLSMemoryBIOProtocol forwards attributes it lacks to the TCP transport
    # under it, whose TLS flag is False.
    if (
        getattr(type(transport), "TLS", True) is False
        and getattr(transport, "TLS", True) is False
        and getattr(transport, "connected", False)
        and not getattr(transport, "disconnecting", True)
        and unsent_bytes(transport) == 0
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # Full, interrupted or broken: Twisted's own write meets it.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def tls_unsent_bytes(transport: object) -> int | None:
    """
    Cleartext bytes a TLS transport (``TLSMemoryBIOProtocol``) holds that
    OpenSSL has not taken yet; ``None`` for a transport that is not one.

    Why private: writes made while OpenSSL must read first (during the
    handshake) wait in ``TLSMemoryBIOProtocol._appSendBuffer``, a list of
    bytes, and no public attribute tells how much; the relay counts them so
    that a TLS end still handshaking is not taken for one that stopped
    reading. Checked on Twisted 26.10.0 (``twisted.protocols.tls``).
    """
    held = getattr(transport, "_appSendBuffer", None)
    if not isinstance(held, list):
        return None
    return sum(len(chunk) for chunk in held)


def disconnect_selectable(reactor: Any, selectable: Any, why: Any, is_read: bool) -> None:
    """
    Disconnect ``selectable`` for the reason its ``doRead`` or ``doWrite``
    returned or raised, as the reactor does for its own readers and writers:
    a clean end of stream on a read of a half-closeable transport is its
    ``readConnectionLost``, anything else its ``connectionLost``.

    Why private: ``PosixReactorBase._disconnectSelectable`` is the reactor's
    own dispatch rule (which reasons are a clean end, half-close, the shared
    Failures); a transport that muxtwist's splice poller tells of readiness
    (``muxtwist.proxy._polled``) must end exactly as one the reactor tells.
    Checked on Twisted 26.10.0 (``twisted.internet.posixbase``; the epoll,
    poll, select and asyncio reactors all inherit it).
    """
    reactor._disconnectSelectable(selectable, why, is_read)


def was_aborted(transport: object) -> bool:
    """
    Whether ``abortConnection()`` was called on a TLS transport
    (``TLSMemoryBIOProtocol``).

    Why private: a failed hostname check aborts the connection from inside
    the handshake, and the handshake may still report completion afterwards;
    ``TLSMemoryBIOProtocol._aborted`` is the only record of the abort before
    ``connectionLost`` arrives. ``False`` for transports without it.
    Checked on Twisted 26.10.0 (``twisted.protocols.tls``).
    """
    return bool(getattr(transport, "_aborted", False))


def listen_errors_raise(service: StreamServerEndpointService) -> None:
    """
    Make ``service.privilegedStartService()`` raise a failed ``listen()``
    (port in use, permission denied) instead of only logging it.

    Why private: ``StreamServerEndpointService._raiseSynchronously`` is the
    switch ``twistd`` itself relies on (it is set by
    ``twisted.application.strports``' callers); there is no constructor
    argument for it. Checked on Twisted 26.10.0.
    """
    service._raiseSynchronously = True


def listening(service: StreamServerEndpointService) -> defer.Deferred[Any] | None:
    """
    The ``Deferred`` of ``service``'s ``endpoint.listen()`` (it fires with the
    ``IListeningPort``), or ``None`` before the service has started.

    Why private: ``StreamServerEndpointService`` keeps it as
    ``_waitingForPort`` and offers no accessor; the port object is the only
    way to learn the address actually bound (``port=0``) and to close it.
    Checked on Twisted 26.10.0.
    """
    waiting: defer.Deferred[Any] | None = service._waitingForPort
    return waiting


def asyncio_loop_of(reactor: object) -> asyncio.AbstractEventLoop | None:
    """
    The asyncio event loop an ``AsyncioSelectorReactor`` runs on; ``None``
    for any other reactor.

    Why private: the reactor is built from a loop (``install(loop)``) but
    keeps it as ``_asyncioEventloop`` with no accessor.
    Checked on Twisted 26.10.0 (``twisted.internet.asyncioreactor``).
    """
    loop = getattr(reactor, "_asyncioEventloop", None)
    return loop if isinstance(loop, asyncio.AbstractEventLoop) else None


def set_port_log_observer(port: object, observer: Any) -> bool:
    """
    Send what a listening TCP port logs to ``observer`` instead of the
    global log publisher; False if ``port`` has no such logger.

    Why private: ``twisted.internet.tcp.Port`` logs through its class-level
    ``_logger`` (a ``twisted.logger.Logger``), among others one "EMFILE
    recovery: Closed socket from {address}" event per client it has to close
    when the process is out of descriptors; Twisted offers no hook to
    throttle them. Checked on Twisted 26.10.0 (``Port.doRead`` builds its
    buffering logger from ``self._logger.namespace`` and ``.observer``).
    """
    from twisted.logger import Logger

    logger = getattr(port, "_logger", None)
    if not isinstance(logger, Logger):
        return False
    port._logger = Logger(namespace=logger.namespace, source=port, observer=observer)  # type: ignore[attr-defined]
    return True


#: The most a daemonizing twistd's parent reads of its status pipe (one ``read(100)``).
_STATUS_BYTES = 100


def tell_twistd_parent(options: Any, problem: str) -> bool:
    """
    Tell the process that started a daemonizing ``twistd`` that the start
    failed, and ``problem`` (cut to fit): it prints that on the terminal
    and exits 1. For a start that ends in ``SystemExit``, which twistd does
    not report itself; ``options`` are twistd's own (the ``parent`` of the
    plugin's options). Returns whether there was such a process to tell:
    ``False`` in the foreground (``twistd -n``) and outside twistd.

    Why private: ``UnixApplicationRunner`` (``twisted.scripts._twistd_unix``)
    keeps the write end of the pipe its waiting parent reads as
    ``options["statusPipe"]`` once it has daemonized, and writes ``b"0"``
    there after a good start, or ``b"1 "`` and the last line of the
    exception, cut to 100 bytes, when the start raised an ``Exception``.
    A ``SystemExit`` it lets through without a word, and its parent, which
    never closed its own copy of the write end, then waits for ever.
    Checked on Twisted 26.10.0.
    """
    fd = options.get("statusPipe") if options is not None else None
    if not isinstance(fd, int):
        return False
    options["statusPipe"] = None  # told once
    data = f"1 {problem}".encode("ascii", "backslashreplace")
    if len(data) > _STATUS_BYTES:
        data = data[: _STATUS_BYTES - 3] + b"..."
    try:
        os.write(fd, data)  # less than PIPE_BUF: written whole, without waiting
    except OSError:
        pass  # the parent is gone
    finally:
        os.close(fd)
    return True


def remove_twistd_pidfile(options: Any) -> bool:
    """
    Remove the pid file ``twistd`` wrote for this process (``--pidfile``),
    as it does itself when a start raises an ``Exception``: for a start
    that ends in ``SystemExit``, after which it leaves the file behind (a
    later ``twistd`` whose pid file names a process that now has that id
    refuses to start). Only a file holding this process's id is removed.
    ``options`` are twistd's own; returns whether a file was removed.

    Why private: ``UnixApplicationRunner.postApplication``
    (``twisted.scripts._twistd_unix``) calls ``removePID`` on
    ``config["pidfile"]`` in its ``except Exception`` only.
    Checked on Twisted 26.10.0.
    """
    path = options.get("pidfile") if options is not None else None
    if not isinstance(path, str) or not path:
        return False
    try:
        with open(path, "rb") as f:
            if f.read().strip() != str(os.getpid()).encode():
                return False
        os.unlink(path)
    except OSError:
        return False
    return True


def reactor_started(reactor: object) -> bool:
    """
    Whether ``reactor.startRunning()`` has been called and the reactor has
    not stopped since (``running`` is only true once the loop is entered).

    Why private: ``ReactorBase._started`` is the flag ``startRunning``
    checks itself to raise ``ReactorAlreadyRunning``; ``running`` alone does
    not tell "started, loop not entered yet" from "never started".
    Checked on Twisted 26.10.0 (``twisted.internet.base.ReactorBase``).
    """
    return bool(getattr(reactor, "_started", False))


def take_exit_signal(reactor: object) -> int | None:
    """
    The stop signal the reactor's own handler took (SIGTERM, SIGINT,
    SIGBREAK), if one did, now forgotten: ``twistd`` then exits as after
    any stop, not by that signal again.

    Why private: ``ReactorBase._exitSignal`` is what the reactor's handlers
    set and what ``twistd`` reads once the reactor has stopped, to kill
    itself with that signal; there is no public way to take a signal as
    handled. Checked on Twisted 26.10.0 (``twisted.internet.base``,
    ``twisted.application.app``).
    """
    number = getattr(reactor, "_exitSignal", None)
    if number is not None:
        reactor._exitSignal = None  # type: ignore[attr-defined]
    return number if isinstance(number, int) else None


def endpoint_port(endpoint: IStreamServerEndpoint) -> tuple[int, str] | None:
    """
    ``(port, interface)`` of a TCP server endpoint built by
    ``serverFromString``; ``None`` for any other endpoint.

    Why private: ``TCP4ServerEndpoint`` and ``TCP6ServerEndpoint`` keep the
    parsed ``_port`` and ``_interface`` and expose neither; parsing the
    description again would mean copying Twisted's parser.
    Checked on Twisted 26.10.0 (``twisted.internet.endpoints``).
    """
    held: Any = endpoint
    port = getattr(held, "_port", None)
    if not isinstance(port, int) or isinstance(port, bool):
        return None
    return port, str(getattr(held, "_interface", ""))


def endpoint_unix_path(endpoint: IStreamServerEndpoint) -> str | None:
    """
    The socket path of a UNIX server endpoint built by ``serverFromString``
    (``unix:PATH``); ``None`` for any other endpoint.

    Why private: ``UNIXServerEndpoint`` keeps the parsed path as
    ``_address`` and exposes it nowhere. Checked on Twisted 26.10.0.
    """
    if type(endpoint).__name__ != "UNIXServerEndpoint":
        return None
    held: Any = endpoint
    path = getattr(held, "_address", None)
    return path if isinstance(path, str) else None


def endpoint_backlog(endpoint: object) -> int | None:
    """
    The ``listen()`` backlog of a TCP or UNIX server endpoint built by
    ``serverFromString`` (``backlog=``, 50 by default); ``None`` for any
    other endpoint.

    Why private: ``TCP4ServerEndpoint``, ``TCP6ServerEndpoint`` and
    ``UNIXServerEndpoint`` keep it as ``_backlog`` and expose it nowhere; ``--workers`` binds its own
    ``SO_REUSEPORT`` sockets for such an endpoint and must listen with the
    backlog the description asked for. Checked on Twisted 26.10.0
    (``twisted.internet.endpoints``).
    """
    backlog = getattr(endpoint, "_backlog", None)
    if not isinstance(backlog, int) or isinstance(backlog, bool):
        return None
    return backlog


def generic_http_channel_base() -> type:
    """
    The protocol ``twisted.web.server.Site`` builds for each connection:
    HTTP/1.1, or HTTP/2 once ALPN chose it, in front of the real channel.

    Why private: ``twisted.web.http._GenericHTTPChannelProtocol`` is what
    ``HTTPFactory.protocol`` builds and has no public name; the WSGI target
    subclasses it to pass half-closes on (twisted.web's channels are not
    half-closeable). Imported here, when asked, so that this module stays
    light. Checked on Twisted 26.10.0 (``twisted.web.http``).
    """
    from twisted.web import http

    base: type = http._GenericHTTPChannelProtocol
    return base


def http_inner_channel(protocol: object) -> Any:
    """
    The ``HTTPChannel`` (or HTTP/2 connection) behind a
    :func:`generic_http_channel_base` instance.

    Why private: kept as ``_channel``, with no public accessor. Checked on
    Twisted 26.10.0 (``twisted.web.http``).
    """
    return getattr(protocol, "_channel", None)


def http_channel_busy(channel: object) -> bool:
    """
    Whether a twisted.web ``HTTPChannel`` is handling a request (its answer
    not yet finished), so a client's half-close must wait for it.

    Why private: ``HTTPChannel._handlingRequest`` is the flag the channel
    itself uses to hold pipelined requests back; ``requests`` lists only
    those not yet answered in full and is empty between parsing and
    dispatch. Checked on Twisted 26.10.0 (``twisted.web.http``).
    """
    return bool(getattr(channel, "_handlingRequest", False))


def http_head_coming(channel: object) -> bool:
    """
    Whether a twisted.web ``HTTPChannel`` has part of a request's head, not
    all of it (the request line not ended yet, or its headers still coming).

    Why private: besides ``_handlingRequest`` (see :func:`http_channel_busy`),
    ``LineReceiver._buffer`` holds a line not ended yet; ``line_mode`` and
    ``requests`` (a request is added at its request line) are public.
    Checked on Twisted 26.10.0 (``twisted.web.http``, ``twisted.protocols.basic``).
    """
    if getattr(channel, "_handlingRequest", False) or not getattr(channel, "line_mode", 0):
        return False
    return bool(getattr(channel, "requests", None) or getattr(channel, "_buffer", b""))


class EndWatcher(Protocol):
    """What :func:`after_connection_lost` tells of a transport's end."""

    def _ended(self, winner: Any) -> object: ...


def after_connection_lost(transport: object, watcher: EndWatcher, winner: object) -> bool:
    """
    Call ``watcher._ended(winner)`` once ``transport``'s own
    ``connectionLost`` has run (so after it told its protocol); ``False``,
    with nothing changed, for a transport where this cannot be done.

    Why: Twisted tells only a transport's protocol that the connection
    ended, and offers its owner no notification. The sniffer gives its
    place as the protocol to the winner, so that data goes straight from
    the transport to the winner, and must not patch the winner's object
    (a user's protocol, perhaps slotted or a ``proxyForInterface``): it sets
    an instance attribute ``connectionLost`` on the transport, Twisted's own
    object, which runs Twisted's method and then reports. This relies on
    Twisted calling the method through the instance: the reactor
    (``posixbase._disconnectSelectable``: ``selectable.connectionLost``),
    ``abortConnection`` (``callLater(0, self.connectionLost, ...)``),
    ``loseConnection`` after a write shutdown, ``readConnectionLost`` of a
    protocol that is not half-closeable, and a wrapping transport's own
    transport (``protocol.connectionLost`` of ``tcp.Connection``, for
    ``TLSMemoryBIOProtocol`` and every ``ProtocolWrapper``).
    Checked on Twisted 26.10.0 (``twisted.internet.tcp``, ``unix``,
    ``abstract``, ``posixbase``, ``asyncioreactor``; ``twisted.protocols.tls``
    and ``policies``).

    Refused: a transport without a ``connectionLost`` of its own (the
    in-memory ``StringTransport`` family and ``iosim.FakeTransport`` tell
    their protocol directly), one whose class makes it a data descriptor,
    and one that takes no instance attribute (``__slots__``).

    Watchers of one transport (nested sniffers, each handing the same
    transport on) are told innermost first: the last one set runs closest
    to Twisted's method.
    """
    method = getattr(type(transport), "connectionLost", None)
    if method is None or hasattr(type(method), "__set__"):
        return False
    held: Any = transport
    current = held.connectionLost
    if isinstance(current, _AfterConnectionLost):
        while isinstance(current.original, _AfterConnectionLost):
            current = current.original
        current.original = _AfterConnectionLost(transport, current.original, watcher, winner)
        return True
    # Twisted's own method is looked up when the end comes; anything else
    # already set on the instance is kept and called instead.
    original = None if getattr(current, "__func__", None) is method else current
    try:
        held.connectionLost = _AfterConnectionLost(transport, original, watcher, winner)
    except AttributeError:
        return False
    return True


class _AfterConnectionLost:
    """
    A transport's ``connectionLost`` while a watcher waits for its end (see
    :func:`after_connection_lost`). Slotted: every handed-off connection
    holds one for its life.
    """

    __slots__ = ("original", "transport", "watcher", "winner")

    def __init__(self, transport: Any, original: Any, watcher: EndWatcher, winner: object) -> None:
        self.transport = transport
        self.original = original
        self.watcher = watcher
        self.winner = winner

    def __call__(self, reason: Failure) -> object:
        transport = self.transport
        if getattr(transport, "connectionLost", None) is self:
            # The transport is Twisted's own again (a TLS layer may be told twice).
            del transport.connectionLost
        original = self.original
        try:
            if original is None:
                return type(transport).connectionLost(transport, reason)
            return original(reason)
        finally:
            self.watcher._ended(self.winner)
