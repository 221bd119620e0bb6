"""
The relay of a :class:`~muxtwist.proxy.Proxy`: one per connection, from the
client to the backend chosen for it (its idle timer is in
:mod:`muxtwist.proxy._idle`, the aborting of ends that linger after a close
in :mod:`muxtwist.proxy._closing`).

While a backend connects, what the client sends waits in the relay, up to
:data:`PENDING_LIMIT` bytes, beyond which reading from the client pauses
until a backend has connected; the sniffed bytes and what waited go first
(after a PROXY header, if asked for); then both directions
flow with each transport registered as the other's streaming producer, so a
slow reader on either side stops reading on the other and memory stays
bounded. After the backend connects, each chunk costs one ``write`` call: the
protocols' ``dataReceived`` *is* the other transport's ``write``.

On Linux, when both ends are plain TCP connections, the relay instead takes
both sockets off Twisted's read/write path once the sniffed bytes are handed
over (see :mod:`muxtwist.proxy._splice`): small exchanges are one ``recv`` and one
``send``, and a direction carrying bulk moves kernel-side with ``splice(2)``
through a pipe, never copied into Python. ``splice=False`` keeps the
portable Twisted relay.

Half-close is passed on both ways between plain TCP and UNIX streams. TLS
has no half-close Twisted can send, so towards a TLS end (``TerminateTLS``,
a TLS listener, ``tls=`` backends) none is passed on: the other side's end
of stream is kept until the TLS end closes (a client that half-closes still
gets the rest of a TLS backend's answer), and a backend that closes first
closes a TLS client with a ``close_notify`` once everything is written.
An abort on one side aborts the other, and every ending cancels its timers
and closes both sockets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import defer, error
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from muxtwist._connect import finished_connect
from muxtwist._deadlines import Deadline
from muxtwist._failures import connect_failure_kind, connect_failure_text
from muxtwist._limits import address_text
from muxtwist._transports import abort, half_close
from muxtwist._twisted import unsent_bytes, was_aborted
from muxtwist.interfaces import ConnectionInfo, IConnectionReport
from muxtwist.proxy import _splice
from muxtwist.proxy._backends import Backend, _OneProtocol
from muxtwist.proxy._closing import ClosingEnds
from muxtwist.proxy._failure_log import FailureLog
from muxtwist.proxy._raw import RawTransport, SpliceFactory

__all__ = ["Relay"]

log = Logger(namespace="muxtwist.proxy")

#: bytes from the client a relay keeps while its backend connects before it
#: stops reading the client (a copying read's worth).
PENDING_LIMIT = 65536


class _RelayOwner(TypingProtocol):
    """What a relay reads and calls on its :class:`~muxtwist.proxy.Proxy`."""

    _reactor: Any
    _failure_log: FailureLog
    relays: set[Relay]
    gave_up: int
    proxy_protocol: int | None
    connect_timeout: float
    close_timeout: float
    idle_timeout: float | None
    splice: bool

    def candidates(self, info: ConnectionInfo) -> list[Backend]: ...

    def _connect_deadline(self, callback: Callable[[], object]) -> Deadline: ...

    def _connect(self, backend: Backend, relay: Relay, factory: Factory) -> defer.Deferred[Any]: ...

    def _header(self, info: ConnectionInfo) -> bytes: ...

    def _connect_failed(self, backend: Backend, kind: str) -> None: ...

    def _connect_succeeded(self, backend: Backend) -> None: ...


@implementer(IHalfCloseableProtocol)
class _BackendSide(Protocol):
    """The backend's end of a relay."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.ready = False
        self.read_closed = False
        self.write_closed = False
        self.lost = False

    def connectionMade(self) -> None:
        if not self.relay.backend_tls:
            self.ready = True
            self.relay._backend_ready(self)

    def dataReceived(self, data: bytes) -> None:
        # Replaced by the client transport's write once the relay runs.
        self.relay.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.read_closed = True
        self.relay._backend_eof()

    def writeConnectionLost(self) -> None:
        self.write_closed = True
        if self.read_closed and self.transport is not None:
            self.relay._close(self.transport)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
        self.lost = True
        self.relay._backend_lost(self, reason)


@implementer(IHandshakeListener)
class _TLSBackendSide(_BackendSide):
    """A backend end reached over TLS: ready once the handshake (and verification) is done."""

    def handshakeCompleted(self) -> None:
        # A failed hostname check aborts from inside the handshake, which may still report completion.
        if was_aborted(self.transport):
            return
        self.ready = True
        self.relay._backend_ready(self)


@implementer(IHalfCloseableProtocol, IConnectionReport)
class Relay(Protocol):
    """
    The client's end of one relay, and the relay itself.

    :ivar info: the connection as the sniffer saw it.
    :ivar backend: the backend being tried or relayed to.
    :ivar side: the backend end, once a backend has connected.
    :ivar spliced: whether the relay runs kernel-side with ``splice(2)``.
    """

    spliced = False

    def __init__(self, proxy: _RelayOwner, info: ConnectionInfo, rule_name: str) -> None:
        self.proxy = proxy
        self.info = info
        self.rule_name = rule_name
        self.backend: Backend | None = None
        self.backend_tls = False
        #: whether the backend connection was made from the client's address.
        self.transparent = False
        self.side: _BackendSide | None = None
        self._pending: list[bytes] | None = []
        #: bytes in ``_pending``; the client is paused once they reach :data:`PENDING_LIMIT`.
        self._pending_size = 0
        self._paused = False
        self._candidates: list[Backend] = []
        self._attempt: defer.Deferred[Any] | None = None
        self._trying: _BackendSide | None = None
        #: the factory of the connect being tried.
        self._connecting: Factory | None = None
        self._timer: IDelayedCall | Deadline | None = None
        self._timed_out = False
        self._client_read_closed = False
        self._client_write_closed = False
        self._client_lost = False
        self._ended = False
        self._splice: _splice.Splice | None = None
        #: ends the relay has closed that have not gone yet (made on the first close).
        self._closing: ClosingEnds | None = None
        self._bytes_in = 0
        self._bytes_out = 0

    @property
    def bytes_in(self) -> int:
        """Bytes relayed from the client to the backend (sniffed bytes and PROXY header included)."""
        return self._splice.bytes_in if self._splice is not None else self._bytes_in

    @property
    def bytes_out(self) -> int:
        """Bytes relayed from the backend to the client."""
        return self._splice.bytes_out if self._splice is not None else self._bytes_out

    @property
    def backend_failed(self) -> bool:
        """Whether the relay ended without ever reaching a backend."""
        return self.side is None

    def buffered(self) -> int:
        """Bytes the relay holds that neither end has taken yet (what backpressure bounds)."""
        if self._splice is not None:
            return self._splice.buffered()
        waiting = self._pending_size if self._pending is not None else 0
        return waiting + sum(unsent_bytes(t) or 0 for t in (self.transport, self.side.transport if self.side else None))

    def _unsplice(self) -> None:
        if self._splice is not None:
            self._splice.stop()

    def __repr__(self) -> str:
        backend = self.backend.description if self.backend else None
        return f"<Relay {self.info.source} -> {backend}>"

    # The client's end

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        if self.info.local is None:
            self.info = self.info.evolve(local=transport.getHost(), peer=self.info.peer or transport.getPeer())
        self.proxy.relays.add(self)
        self._candidates = self.proxy.candidates(self.info)
        self._try_next()

    def dataReceived(self, data: bytes) -> None:
        # Until the backend connects; then replaced by the backend transport's write.
        pending = self._pending
        if pending is not None:
            pending.append(data)
            self._pending_size += len(data)
            if self._pending_size >= PENDING_LIMIT and not self._paused:
                # The client is read while the backend connects (no pause and
                # resume per connection), until this much waits for it.
                self._paused = True
                self.transport.pauseProducing()  # type: ignore[union-attr]
        elif self.side is not None:
            self.side.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self._client_read_closed = True
        side = self.side
        if side is not None and not side.lost:
            transport = side.transport
            assert transport is not None
            transport.unregisterProducer()  # type: ignore[attr-defined]
            half_close(transport)
        self._close_client_if_done()

    def writeConnectionLost(self) -> None:
        self._client_write_closed = True
        self._close_client_if_done()

    def _close_client_if_done(self) -> None:
        if self._client_read_closed and self._client_write_closed and self.transport is not None:
            self._close(self.transport)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
        self._client_lost = True
        self._unsplice()
        self._cancel_attempt()
        side = self.side
        if side is not None and not side.lost:
            transport = side.transport
            assert transport is not None
            if isinstance(reason.value, error.ConnectionDone):
                transport.unregisterProducer()  # type: ignore[attr-defined]
                self._close(transport)
            else:
                abort(transport)
        self._maybe_end()

    # The backend's end

    def _try_next(self) -> None:
        proxy = self.proxy
        if not self._candidates:
            proxy.gave_up += 1
            proxy._failure_log.gave_up(self.rule_name, self.info.source)
            assert self.transport is not None
            self._close(self.transport)
            return
        backend = self._candidates.pop(0)
        self.backend = backend
        self.backend_tls = backend.tls
        side = (_TLSBackendSide if backend.tls else _BackendSide)(self)
        self._trying = side
        self._timed_out = False
        self._timer = proxy._connect_deadline(self._connect_timed_out)
        factory = SpliceFactory(side, proxy._reactor) if proxy.splice and not backend.tls else _OneProtocol(side)
        self._connecting = factory
        attempt = proxy._connect(backend, self, factory)
        if self._trying is side and not side.ready:
            self._attempt = attempt
        attempt.addCallbacks(self._attempt_connected, self._attempt_failed, callbackArgs=(side,), errbackArgs=(side,))

    def _connect_timed_out(self) -> None:
        self._timer = None
        if self._attempt is not None and not self.backend_tls and finished_connect(self._connecting):
            # The kernel had connected it; this process was too busy to look
            # (a burst, a long pause): not the backend's timeout.
            return
        self._timed_out = True
        if self._attempt is not None:
            self._attempt.cancel()
        elif self._trying is not None and self._trying.transport is not None:
            # Connected, but the TLS handshake did not finish in time.
            abort(self._trying.transport)

    def _cancel_attempt(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        attempt, self._attempt = self._attempt, None
        trying, self._trying = self._trying, None
        if attempt is not None:
            attempt.cancel()
        elif trying is not None and trying.transport is not None and not trying.lost:
            abort(trying.transport)

    def _attempt_connected(self, protocol: object, side: _BackendSide) -> None:
        # With TLS the handshake is still to come; the timer keeps running.
        if self._trying is side:
            self._attempt = None

    def _attempt_failed(self, reason: Failure, side: _BackendSide) -> None:
        if self._trying is side:
            self._attempt = None
            self._failed(side, reason)

    def _failed(self, side: _BackendSide, reason: Failure) -> None:
        """A connect attempt failed: refused, timed out, reset or TLS refused."""
        self._trying = None
        # Nothing went out from the client's address: connection_end must not say it did.
        self.transparent = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._client_lost:
            return
        backend = self.backend
        assert backend is not None
        if self._timed_out:
            kind, problem = "timeout", f"no connection within {self.proxy.connect_timeout}s"
        else:
            kind, problem = connect_failure_kind(reason), connect_failure_text(reason)
        self.proxy._connect_failed(backend, kind)
        # At most a line a second per backend: a dead one behind a connect loop must not flood the log.
        self.proxy._failure_log.connect_failed(self.rule_name, backend.description, self.info.source, kind, problem)
        self._try_next()

    def _warn(self, format: str, backend: Backend, kind: str, problem: str) -> None:
        """Log a backend's failure for this relay's client (``format`` names rule, backend, client, kind, problem)."""
        log.warn(
            format,
            rule=self.rule_name,
            backend=backend.description,
            client=address_text(self.info.source),
            kind=kind,
            problem=problem,
        )

    def _backend_ready(self, side: _BackendSide) -> None:
        if self._trying is not side:
            return
        self._trying = None
        self._attempt = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        backend_transport = side.transport
        client_transport = self.transport
        assert backend_transport is not None and client_transport is not None and self.backend is not None
        if self._client_lost:
            abort(backend_transport)
            return
        self.side = side
        self.proxy._connect_succeeded(self.backend)
        if self.transparent:
            self.backend.stats.transparent += 1
        pending, self._pending = self._pending or [], None
        if self.proxy.proxy_protocol is not None:
            pending.insert(0, self.proxy._header(self.info))
        first = b"".join(pending)
        if self._start_splice(client_transport, backend_transport, first):
            self._linked()
            return
        if first:
            self._bytes_in += len(first)
            backend_transport.write(first)
        client_transport.registerProducer(backend_transport, True)  # type: ignore[attr-defined]
        backend_transport.registerProducer(client_transport, True)  # type: ignore[attr-defined]
        self._link(client_transport, backend_transport, side)
        self._linked()
        if self._client_read_closed:
            backend_transport.unregisterProducer()  # type: ignore[attr-defined]
            half_close(backend_transport)
        else:
            client_transport.resumeProducing()  # type: ignore[attr-defined]

    def _can_splice(self) -> bool:
        """Whether the proxy allows splicing and the client's end can be spliced now."""
        return (
            self.proxy.splice
            and not self._client_read_closed
            and not self._client_lost
            and _splice.spliceable(self.transport)
        )

    def _start_splice(self, client_transport: ITransport, backend_transport: ITransport, first: bytes) -> bool:
        """Relay with ``splice(2)`` from now on, if the proxy allows it and both ends can."""
        # A socket the relay took as it is was taken because it can splice (SpliceFactory, just now).
        if not isinstance(backend_transport, RawTransport) and not (
            self._can_splice() and _splice.spliceable(backend_transport)
        ):
            return False
        splice = _splice.Splice(
            client_transport,  # type: ignore[arg-type]
            backend_transport,  # type: ignore[arg-type]
            first,
            client_transport.reactor,  # type: ignore[attr-defined]
        )
        self._splice = splice
        self.spliced = True
        splice.start()
        return True

    def _link(self, client_transport: ITransport, backend_transport: ITransport, side: _BackendSide) -> None:
        """From now on each chunk is counted and written to the other transport, and nothing else."""
        to_backend = backend_transport.write
        to_client = client_transport.write

        def from_client(data: bytes) -> None:
            self._bytes_in += len(data)
            to_backend(data)

        def from_backend(data: bytes) -> None:
            self._bytes_out += len(data)
            to_client(data)

        self.dataReceived = from_client  # type: ignore[method-assign]
        side.dataReceived = from_backend  # type: ignore[method-assign]

    def _linked(self) -> None:
        """Hook for subclasses: bytes flow from now on."""

    def _backend_eof(self) -> None:
        client_transport = self.transport
        side = self.side
        assert side is not None and side.transport is not None
        if client_transport is not None and not self._client_lost:
            client_transport.unregisterProducer()  # type: ignore[attr-defined]
            if not half_close(client_transport):
                self._close(client_transport)
        if side.write_closed:
            self._close(side.transport)

    def _backend_lost(self, side: _BackendSide, reason: Failure) -> None:
        self._unsplice()
        if self.side is not side:
            # Lost before the relay ran: a failed connect or TLS handshake.
            if self._trying is side:
                self._attempt = None
                self._failed(side, reason)
            return
        client_transport = self.transport
        if not self._client_lost and client_transport is not None:
            if isinstance(reason.value, error.ConnectionDone):
                client_transport.unregisterProducer()  # type: ignore[attr-defined]
                self._close(client_transport)
            else:
                backend = self.backend
                assert backend is not None
                backend.stats.failures += 1
                backend.stats.errors["reset"] = backend.stats.errors.get("reset", 0) + 1
                self._warn(
                    "rule {rule}: backend {backend} reset the relay for {client} mid-stream ({kind}: {problem})",
                    backend,
                    connect_failure_kind(reason),
                    connect_failure_text(reason),
                )
                abort(client_transport)
        self._maybe_end()

    def _maybe_end(self) -> None:
        if self._ended or not self._client_lost:
            return
        if self.side is not None and not self.side.lost:
            return
        self._ended = True
        self._unsplice()
        self._pending = None
        if self.side is not None and self.backend is not None:
            self.backend.stats.active -= 1
            self.backend.stats.bytes_in += self.bytes_in
            self.backend.stats.bytes_out += self.bytes_out
        self.proxy.relays.discard(self)
        if self._closing is not None:
            self._closing.stop()
        self._stop_timers()

    # Closing ends that do not go away

    def _close(self, transport: ITransport) -> None:
        """
        Close one end cleanly, and abort it if it is still there after
        ``close_timeout`` seconds in which its peer took no byte: a TLS
        client that never answers our ``close_notify`` (the TLS layer waits
        for that answer before closing the socket), or a reader that stopped
        reading what we still have to write.
        """
        transport.loseConnection()
        if self._ended or self._gone(transport):
            return
        splice = self._splice
        if splice is not None and splice.closed_both:
            # The splice ended both ways and closes both ends now: nothing lingers.
            return
        if self._closing is None:
            self._closing = ClosingEnds(self, self.proxy._reactor, self.proxy.close_timeout)
        self._closing.add(transport)

    def _gone(self, transport: ITransport) -> bool:
        if transport is self.transport:
            return self._client_lost
        side = self.side
        return side is None or transport is not side.transport or side.lost

    def _stop_timers(self) -> None:
        """Hook for subclasses with timers of their own."""
