"""
One sniffed connection, :class:`SniffingProtocol`: its first bytes are
buffered and shown to the rules in order (when, is below: the matcher work
of a connection is bounded), and the connection is handed, bytes replayed,
to the winner's factory.

After the handoff the winning protocol is put in the sniffer's place on the
transport (``transport.protocol`` of a TCP or UNIX connection,
``transport.wrappedProtocol`` of a TLS or other wrapping transport), so it
receives data straight from the transport and the sniffer costs nothing per
byte. The end of the connection is learned from the transport, whose
``connectionLost`` tells the sniffer after Twisted's own has run
(:func:`muxtwist._twisted.after_connection_lost`); the winner's object is
never changed. Only on a transport that has neither attribute, or that
cannot tell its end so (in-memory transports), does the sniffer stay in
between and pass each chunk on with one call.

The class is built in layers, each a base class with its own slots: the
PROXY pre-stage (:mod:`muxtwist._prestage`), then the connection's record
and its end (:mod:`muxtwist._sniffing_end`), then this module's buffering,
deciding and handoff. The factory is :class:`muxtwist.sniffing.SniffingFactory`.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    ITransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from muxtwist._deadlines import Deadline, Deadlines
from muxtwist._inner import InnerFactories, RuleSet, tell_retiring
from muxtwist._rules import Outcome, RuleStats
from muxtwist._sniffing_end import EndOfConnection, EndOwner
from muxtwist._transports import abort
from muxtwist._twisted import after_connection_lost
from muxtwist.interfaces import (
    ConnectionInfo,
    IConnectionInfoFactory,
    IMatcher,
    IRespondingMatcher,
    Verdict,
)
from muxtwist.proxyprotocol import ProxyHeaderReader, Trust

__all__ = [
    "EAGER_BYTES",
    "EAGER_EVALUATIONS",
    "QUIET_BUDGET",
    "QUIET_DELAY",
    "SniffingProtocol",
    "max_matcher_work",
]

# The sniffer's namespace: filters and log pipelines select its events by it.
log = Logger(namespace="muxtwist.sniffing")

# When the rules see the buffer. The matcher work of one connection is
# bounded by a constant times max_sniff_bytes, whatever the client's timing
# and sniff_timeout (max_matcher_work gives the bound):
#
# - eagerly: while the buffer holds at most EAGER_BYTES, each chunk is
#   evaluated at once, for the first EAGER_EVALUATIONS evaluations (the usual
#   opener arrives whole in the first chunk and is decided there);
# - on growth: a chunk that grows the buffer by a quarter since the last
#   evaluation is evaluated at once; these sizes grow geometrically, so they
#   sum to less than 5 * max_sniff_bytes;
# - on a pause: bytes held back are evaluated once the client has sent
#   nothing for QUIET_DELAY (the timer re-arms itself until there really is
#   such a pause), while the scans these cost stay within QUIET_BUDGET *
#   max_sniff_bytes; past that budget, only growth and the final evaluation
#   remain;
# - finally, once: max_sniff_bytes reached, end of stream, or sniff_timeout.
EAGER_BYTES = 1024
EAGER_EVALUATIONS = 32
QUIET_DELAY = 0.02
QUIET_BUDGET = 4


def max_matcher_work(max_sniff_bytes: int) -> int:
    """
    The most bytes one matcher is shown over one connection's sniffing:
    ``EAGER_EVALUATIONS * min(EAGER_BYTES, max_sniff_bytes)`` for the eager
    evaluations, ``5 * max_sniff_bytes`` for those on growth,
    ``QUIET_BUDGET * max_sniff_bytes`` for those after a pause, and
    ``max_sniff_bytes`` for the final one (12 * 16 KiB at the defaults).
    """
    eager = EAGER_EVALUATIONS * min(EAGER_BYTES, max_sniff_bytes)
    return eager + (5 + QUIET_BUDGET + 1) * max_sniff_bytes


class _Factory(EndOwner, Protocol):
    """What a connection reads of, and tells, its :class:`~muxtwist.sniffing.SniffingFactory`."""

    _reactor: IReactorTime
    sniff_timeout: float
    _deadlines: Deadlines | None
    _ruleset: RuleSet
    _inner: InnerFactories

    @property
    def _trusted(self) -> Trust | None: ...

    def _add(self, p: SniffingProtocol) -> None: ...

    def _use(self, f: IProtocolFactory) -> None: ...

    def _stop_retired(self) -> None: ...


@implementer(IProtocol, IHalfCloseableProtocol)
class SniffingProtocol(EndOfConnection):
    """
    One connection while it is being sniffed, and its record afterwards.

    Slotted: tens of thousands of these may sit waiting for their first byte.
    """

    factory: _Factory

    __slots__ = (
        "_buffer",
        "_deadline",
        "_evaluations",
        "_last_data",
        "_next_eval",
        "_quiet",
        "_quiet_left",
        "_read_closed",
        "_responder",
        "_ruleset",
        "addr",
        "factory",
        "transport",
        "winner",
    )

    def __init__(self, factory: _Factory, addr: IAddress, info: ConnectionInfo | None) -> None:
        self.factory = factory
        self.addr = addr
        self._info = info
        self._ruleset = factory._ruleset
        self.transport: ITransport | None = None
        self._buffer: bytearray | None = bytearray()
        self._overflow = b""
        self._deadline: Deadline | None = None
        self._quiet: IDelayedCall | None = None
        self._next_eval = 0
        self._evaluations = 0
        self._last_data = 0.0
        self._quiet_left = QUIET_BUDGET * factory.max_sniff_bytes
        self._handed_to: IProtocolFactory | None = None
        self._read_closed = False
        self._responder: IRespondingMatcher | None = None
        self._active: RuleStats | None = None
        self._proxy_reader: ProxyHeaderReader | None = None
        self._source: str | None = None
        self._bytes_in = 0
        self._bytes_out = 0
        self.winner: IProtocol | None = None
        self.rule_name = ""
        self.outcome: Outcome | None = None
        self.started = 0.0
        self.sniff_time: float | None = None
        self.ended_at: float | None = None

    def __repr__(self) -> str:
        state = "sniffing" if self.sniffing else f"{self.outcome and self.outcome.value}:{self.rule_name}"
        return f"<SniffingProtocol {self.addr} {state}>"

    @property
    def sniffing(self) -> bool:
        """Whether the rules have not decided yet."""
        return self.outcome is None

    @property
    def info(self) -> ConnectionInfo:
        """What the matchers see of this connection."""
        assert self._info is not None
        return self._info

    # IProtocol

    def makeConnection(self, transport: ITransport) -> None:
        self.transport = transport
        self.connectionMade()

    def connectionMade(self) -> None:
        factory = self.factory
        reactor = factory._reactor
        self.started = reactor.seconds()
        transport = self.transport
        assert transport is not None
        if self._info is None:
            self._info = ConnectionInfo(peer=transport.getPeer(), local=transport.getHost())
        factory._add(self)
        self._ruleset.sniffing += 1
        deadlines = factory._deadlines
        if deadlines is None or deadlines.delay != factory.sniff_timeout:
            # The first connection, or a reload changed sniff_timeout: one queue per length.
            deadlines = factory._deadlines = Deadlines(reactor, factory.sniff_timeout)
        self._deadline = deadlines.add(self._timed_out)
        if factory._trusted is not None:
            self._start_proxy_stage(self._info, factory._trusted)
        elif not self._ruleset.waits:
            # A rule may decide on the connection alone (RemoteAddress), or write first.
            self._evaluate(final=None, data=b"")

    def dataReceived(self, data: bytes) -> None:
        if self.winner is not None:
            # Forwarding mode: a transport we could not swap the winner into.
            self.winner.dataReceived(data)
            return
        buffer = self._buffer
        if buffer is None:
            return
        if self._proxy_reader is not None:
            data = self._read_proxy_header(data)
            if not data or self._buffer is None:
                return
        room = self.factory.max_sniff_bytes - len(buffer)
        if len(data) >= room:
            # The cap: decide on exactly max_sniff_bytes. What this read
            # brought beyond it is not sniffed; the winner gets it after the
            # replay (the rest of the stream is still in the kernel).
            if len(data) > room:
                self._overflow = data[room:]
                data = data[:room]
            buffer += data
            self._evaluate(final=Outcome.NO_MATCH)
            return
        buffer += data
        size = len(buffer)
        if size >= self._next_eval:
            # The usual case: the whole opener in the first chunk, decided
            # here without copying the buffer again.
            self._evaluate(final=None, data=data if size == len(data) else None)
            return
        reactor = self.factory._reactor
        self._last_data = reactor.seconds()
        if self._quiet is None and size <= self._quiet_left:
            self._quiet = reactor.callLater(QUIET_DELAY, self._quiet_evaluate)

    def readConnectionLost(self) -> None:
        if self.winner is not None:
            if IHalfCloseableProtocol.providedBy(self.winner):
                self.winner.readConnectionLost()
            elif self.transport is not None:
                self.transport.loseConnection()
            return
        self._read_closed = True
        if self._buffer is not None and self._finish_proxy_stage("its end of stream"):
            self._evaluate(final=Outcome.NO_MATCH)

    def writeConnectionLost(self) -> None:
        if self.winner is not None and IHalfCloseableProtocol.providedBy(self.winner):
            self.winner.writeConnectionLost()

    def connectionLost(self, reason: Failure) -> None:
        if self.winner is not None:
            winner, self.winner = self.winner, None
            try:
                winner.connectionLost(reason)
            finally:
                self._ended(winner)
            return
        if self.sniffing:
            self._end_sniffing(Outcome.CLOSED, "")
        self._ended()

    # Deciding

    def _quiet_evaluate(self) -> None:
        self._quiet = None
        buffer = self._buffer
        if buffer is None:
            return
        reactor = self.factory._reactor
        idle = reactor.seconds() - self._last_data
        if idle < QUIET_DELAY - 1e-6:
            # Bytes came since the timer was armed: not a pause yet. (The
            # margin keeps a rounding error from re-arming it for no time.)
            self._quiet = reactor.callLater(QUIET_DELAY - idle, self._quiet_evaluate)
            return
        if len(buffer) <= self._quiet_left:
            self._quiet_left -= len(buffer)
            self._evaluate(final=None)

    def _timed_out(self) -> None:
        self._deadline = None
        if self._buffer is not None and self._finish_proxy_stage("the sniff timeout"):
            self._evaluate(final=Outcome.TIMEOUT)

    def _evaluate(self, final: Outcome | None, data: bytes | None = None) -> None:
        """
        Show the buffer (``data``, when the caller has it as bytes already)
        to the rules in order. ``final`` is None for an ordinary evaluation,
        or the reason this is the last one, in which NEED_MORE counts as
        NO_MATCH.
        """
        buffer = self._buffer
        assert buffer is not None
        if self._quiet is not None:
            self._quiet.cancel()
            self._quiet = None
        if data is None:
            data = bytes(buffer)
        size = len(data)
        self._evaluations += 1
        if size <= EAGER_BYTES and self._evaluations < EAGER_EVALUATIONS:
            self._next_eval = size + 1
        else:
            self._next_eval = size + (size >> 2) + 1
        info = self.info
        for rule in self._ruleset.rules:
            try:
                verdict = rule.matcher.match(data, info)
            except Exception:
                log.failure("matcher of rule {rule} raised; taken as NO_MATCH", rule=rule.name)
                continue
            if verdict is Verdict.MATCH:
                if final is None and self._answer_pending(data):
                    return
                self._hand_off(rule.factory, rule.name, Outcome.HANDED_OFF, data, rule.max_connections)
                return
            if verdict is Verdict.NEED_MORE and final is None:
                self._respond(rule.matcher, data)
                return
        if final is Outcome.TIMEOUT and not data:
            self._hand_off(self._ruleset.on_timeout, "on_timeout", Outcome.TIMEOUT, data)
        elif final is not None or (data and not self._answer_pending(data)):
            self._hand_off(self._ruleset.on_no_match, "on_no_match", Outcome.NO_MATCH, data)
        # else: no rule can tell from zero bytes; wait for the first ones.

    def _answer_pending(self, data: bytes) -> bool:
        """
        Whether the client's answer to what a responding matcher wrote is
        still to come (its ``filter_replay`` finds nothing to remove in
        ``data``). A client that sent its opener before those bytes reached
        it (curl, h2load: HTTP/2 clients that do not wait for the server's
        SETTINGS) answers after it; handed off now, the winner would get that
        answer after the replay, where nothing removes it (a SETTINGS ACK for
        SETTINGS it never sent, which nghttp2 servers end the connection
        for). So the hand-off waits for it, up to the final evaluation.
        """
        responder = self._responder
        return responder is not None and responder.filter_replay(data) == data

    def _respond(self, matcher: IMatcher, data: bytes) -> None:
        if self._responder is not None or not IRespondingMatcher.providedBy(matcher):
            return
        try:
            out = matcher.respond(data, self.info)
        except Exception:
            log.failure("matcher {name} raised in respond()", name=matcher.name)
            return
        if out:
            self._responder = matcher
            self._bytes_out += len(out)
            assert self.transport is not None
            self.transport.write(out)

    def _end_sniffing(self, outcome: Outcome, rule_name: str) -> None:
        if self.transport is not None and self.outcome is None:
            ruleset = self._ruleset
            ruleset.sniffing -= 1
            if not ruleset.sniffing and self.factory._inner.retiring:
                self.factory._stop_retired()
        self.outcome = outcome
        self.rule_name = rule_name
        if self._buffer is not None:
            self._bytes_in = len(self._buffer)
        self._buffer = None
        self.sniff_time = self.factory._reactor.seconds() - self.started
        for call in (self._deadline, self._quiet):
            if call is not None and call.active():
                call.cancel()
        self._deadline = self._quiet = None
        if rule_name:
            stats = self.factory.stats
            ruled = stats.get(rule_name)
            if ruled is None:
                ruled = stats[rule_name] = RuleStats()
            ruled.total += 1

    def _hand_off(
        self,
        factory: IProtocolFactory | None,
        rule_name: str,
        outcome: Outcome,
        data: bytes,
        limit: int | None = None,
    ) -> None:
        transport = self.transport
        assert transport is not None
        overflow, self._overflow = self._overflow, b""
        if factory is not None:
            # Counted before sniffing ends, so that a reload's retiring of
            # this factory waits for this connection.
            self._handed_to = factory
            self.factory._use(factory)
        self._end_sniffing(outcome, rule_name)
        if factory is None:
            self._close_unhandled(transport, rule_name)
            return
        if limit is not None and self.factory.stats[rule_name].active >= limit:
            self.factory._refused(self.info.source, "rule_max_connections", limit, rule_name)
            self.outcome = Outcome.REJECTED
            transport.loseConnection()
            return
        try:
            if IConnectionInfoFactory.providedBy(factory):
                proto = factory.buildProtocolForConnection(self.addr, self.info, rule_name)
            else:
                proto = factory.buildProtocol(self.addr)
        except Exception:
            log.failure("factory of rule {rule} raised in buildProtocol", rule=rule_name)
            proto = None
        if proto is None:
            self._close_unhandled(transport, rule_name)
            return
        if self._responder is not None:
            data = self._responder.filter_replay(data)
        self._attach(transport, proto)
        self._active = self.factory.stats[rule_name]
        self._active.active += 1
        proto.makeConnection(transport)
        if data and not _closing(transport):
            proto.dataReceived(data)
        if overflow and not _closing(transport):
            proto.dataReceived(overflow)
        if self._read_closed and not _closing(transport):
            if IHalfCloseableProtocol.providedBy(proto):
                proto.readConnectionLost()
            else:
                transport.loseConnection()
        if self._ruleset.retired or id(factory) in self.factory._inner.retiring:
            # Sniffed under rules that have since stopped naming the winner,
            # which was told so before this connection reached it: tell it
            # again, so that it finishes this one too (after the replay, so
            # that a request it carries is answered first).
            tell_retiring(factory)

    def _close_unhandled(self, transport: ITransport, rule_name: str) -> None:
        if rule_name not in ("on_timeout", "on_no_match"):
            self.factory._refusals.declined(self.addr, rule_name)
            self.outcome = Outcome.REJECTED
        transport.loseConnection()

    def _attach(self, transport: ITransport, proto: IProtocol) -> None:
        """
        Put ``proto`` where the transport delivers data, and learn of the end
        from the transport (never from ``proto``, a user's object); on a
        transport that cannot tell (in-memory ones), stay in between.
        """
        for attribute in ("protocol", "wrappedProtocol"):
            if getattr(transport, attribute, None) is self:
                if after_connection_lost(transport, self, proto):
                    setattr(transport, attribute, proto)
                    return
                break
        self.winner = proto

    def abort(self) -> None:
        """Abort the connection at once (a stop's deadline, or a stop while sniffing)."""
        transport = self.transport
        if transport is None:
            return
        if self.sniffing:
            self._end_sniffing(Outcome.ABORTED, "")
        abort(transport)


def _closing(transport: ITransport) -> bool:
    """Whether the transport is closing or closed (then the winner gets no replay)."""
    return bool(
        getattr(transport, "disconnecting", False)
        or getattr(transport, "disconnected", False)
        or getattr(transport, "connected", True) is False
    )
