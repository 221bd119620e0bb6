"""
:class:`UDPMux`: the rules of one UDP listener applied per flow.

A flow is one remote (address, port). Its first datagrams are held and shown
to the rules in order, as on TCP (see :mod:`muxtwist.matchers.datagram` for
how datagram boundaries reach matchers); the first rule whose verdict is not
NO_MATCH decides. NEED_MORE waits for the flow's next datagram, at most
``max_sniff_datagrams`` of them and ``sniff_timeout`` seconds, after which
one final evaluation counts NEED_MORE as NO_MATCH. The winner, a
``DatagramProtocol``, gets the held datagrams replayed in order, then every
later datagram of the flow, each with the flow's address; its transport's
``write(data, addr)`` answers through the listening socket. No match: the
datagrams are dropped and the remote is remembered as unmatched for
``unmatched_timeout`` seconds.

The mux itself never sends a datagram: only targets answer, and only to
their own flows, so nothing here can be used to amplify a spoofed request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import AbstractDatagramProtocol, DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from muxtwist._options import shown
from muxtwist._rules import check_unique_names
from muxtwist._text import BurstLog
from muxtwist._twisted import default_reactor
from muxtwist.interfaces import Verdict
from muxtwist.matchers.datagram import DatagramInfo
from muxtwist.udp._counts import FlowCounts, Uncounted
from muxtwist.udp.flows import Address, Flow, FlowTable
from muxtwist.udp.interfaces import IFlowTarget, IFlowTransport

if TYPE_CHECKING:
    from muxtwist._rules import Rule
    from muxtwist.metrics import Metrics

__all__ = ["MAX_DATAGRAM", "UDPMux", "is_datagram_target"]

log = Logger()

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

#: The largest UDP payload (IPv4: 65535 - 20 - 8 = 65507; IPv6 jumbograms
#: aside). Sockets read with a buffer this size, so that no datagram is cut
#: short (Twisted's listenUDP reads 8192 bytes by default).
MAX_DATAGRAM = 65535


def is_datagram_target(value: object) -> bool:
    """Whether ``value`` can be a UDP rule's target (a ``DatagramProtocol``)."""
    return isinstance(value, AbstractDatagramProtocol)


@implementer(IFlowTransport)
class _TargetTransport:
    """What a target sees as its transport: writes go out of the listening socket, to its own flows only."""

    def __init__(self, mux: UDPMux, target: AbstractDatagramProtocol) -> None:
        self._mux = mux
        self._target = target

    def write(self, data: bytes, addr: Any = None) -> None:
        self._mux._send(self._target, data, addr)

    def getHost(self) -> Any:
        return self._mux.host

    def flow_writer(self, addr: tuple[str, int]) -> Any:
        flow = self._mux.table.flows.get((addr[0], addr[1]))
        if flow is None or flow.target is not self._target or self._mux._sendto is None:
            return None
        return _FlowWriter(self._mux, flow).write

    def end_flow(self, addr: tuple[str, int], outcome: str = "handed_off") -> None:
        self._mux.end_flow((addr[0], addr[1]), outcome=outcome, reason="target")

    def loseConnection(self) -> None:
        """Targets do not own the listening socket: nothing to close."""

    def stopListening(self) -> None:
        """Targets do not own the listening socket: nothing to stop."""

    def connect(self, host: str, port: int) -> None:
        raise RuntimeError("a UDP rule's target answers its flows; it cannot connect the listening socket")


class _FlowWriter:
    """
    Sends one flow's datagrams through the listening socket (see
    ``IFlowTransport.flow_writer``): the flow is looked up once, not per
    datagram, and a flow that ended drops what is still written to it.
    """

    __slots__ = ("_flow", "_mux", "_seconds", "_sendto")

    def __init__(self, mux: UDPMux, flow: Flow) -> None:
        self._mux = mux
        self._flow = flow
        self._sendto = mux._sendto
        self._seconds = mux._reactor.seconds

    def write(self, data: bytes) -> None:
        flow = self._flow
        if flow.ended:
            self._mux.stats.dropped["not_a_flow"] += 1
            return
        try:
            self._sendto(data, flow.addr)
        except OSError as e:
            self._mux._send_failed(flow, e)
            return
        flow.datagrams_out += 1
        flow.bytes_out += len(data)
        flow.last = self._seconds()


class _Listening(DatagramProtocol):
    """The protocol of the listening socket: every datagram goes to the mux."""

    def __init__(self, mux: UDPMux) -> None:
        self.mux = mux
        self.datagramReceived = mux.datagram_received  # type: ignore[assignment,method-assign]

    def startProtocol(self) -> None:
        self.mux.listening(self.transport)

    def stopProtocol(self) -> None:
        self.mux.not_listening()


class UDPMux:
    """
    The sniffer of one UDP listener: flows, rules, targets.

    Listen with ``reactor.listenUDP(port, mux.protocol,
    maxPacketSize=MAX_DATAGRAM)`` (Twisted's default of 8192 bytes cuts larger
    datagrams short), or through :class:`~muxtwist.udp.listener.UDPListener`
    and ``MuxService``.

    :param rules: :class:`~muxtwist.sniffing.Rule` s whose targets are
        ``DatagramProtocol`` s (each target serves one listener).
    :param sniff_timeout: seconds a flow may stay undecided.
    :param max_sniff_datagrams: the most datagrams held while undecided.
    :param max_sniff_bytes: once the datagrams held for a flow reach this
        many bytes, the evaluation is the final one (as on TCP), so a flow
        still undecided holds less than this.
    :param max_udp_flows: the most entries in the flow table (live flows and
        remembered unmatched remotes together).
    :param max_flows_per_source: the most live flows from one source host.
    :param flow_idle_timeout: seconds without a datagram either way after
        which a handed-off flow ends, for targets that do not set their own
        ``idle_timeout``.
    :param unmatched_timeout: seconds a remote no rule matched is remembered
        (its datagrams dropped unseen).
    :param on_no_match: a target for flows no rule matches (default: drop).
    :param log_connections: one ``connection_end`` log event per flow; for
        flows that got nothing back (no rule matched, or the target refused
        them at once) at most one a second per outcome and reason, with the
        count of those left out; when such a burst stops, the count still
        pending is logged within a second (``connection_end_suppressed``),
        and at once when the mux stops.
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        *,
        sniff_timeout: float = 5.0,
        max_sniff_datagrams: int = 4,
        max_sniff_bytes: int = 16384,
        max_udp_flows: int = 10000,
        max_flows_per_source: int | None = None,
        flow_idle_timeout: float = 60.0,
        unmatched_timeout: float = 30.0,
        on_no_match: AbstractDatagramProtocol | None = None,
        metrics: Metrics | None = None,
        log_connections: bool = True,
        reactor: IReactorTime | None = None,
    ) -> None:
        self._reactor: IReactorTime = default_reactor(reactor)
        if max_sniff_datagrams < 1:
            raise ValueError(f"max_sniff_datagrams must be at least 1, got {shown(max_sniff_datagrams)}")
        self.sniff_timeout = sniff_timeout
        self.max_sniff_datagrams = max_sniff_datagrams
        self.max_sniff_bytes = max_sniff_bytes
        self.flow_idle_timeout = flow_idle_timeout
        self.log_connections = log_connections
        self.table = FlowTable(max_udp_flows, max_flows_per_source, unmatched_timeout)
        # Counted where the owner says: the Metrics given here (which then
        # read this mux's flow table), as a MuxService gives its own. Built
        # alone, it counts into counters nothing reads.
        self.metrics: Metrics | Uncounted = Uncounted() if metrics is None else metrics
        self.stats: FlowCounts = FlowCounts() if metrics is None else metrics.track_udp(self)
        self.protocol = _Listening(self)
        self.port: Any = None
        self.host: Any = None
        self._sendto: Any = None
        self._started = 0
        self._targets: dict[int, AbstractDatagramProtocol] = {}
        # Live flows per target (by id), so that a target a reload retired
        # is stopped once its last flow ends.
        self._live: dict[int, int] = {}
        self._log_throttle: BurstLog[tuple[Address, Any, str, str, str]] = BurstLog(self._reactor, _ends_tail)
        self.rules: tuple[Rule, ...] = ()
        self.on_no_match: AbstractDatagramProtocol | None = None
        self.set_rules(rules, on_no_match=on_no_match)

    def __repr__(self) -> str:
        return f"<UDPMux rules={[r.name for r in self.rules]}>"

    # --- rules and targets -------------------------------------------------

    def set_rules(
        self, rules: Sequence[Rule], *, on_no_match: AbstractDatagramProtocol | None = None, **_: object
    ) -> None:
        """
        Use these rules for flows that start from now on (a reload); live
        flows keep their targets. Extra keywords (TCP-only settings) are
        ignored so that a reload can treat every listener alike. If a new
        target cannot start (its ``startProtocol`` raises), the targets
        started for these rules are stopped again, the old rules stay, and
        the error is raised.
        """
        for rule in rules:
            if not is_datagram_target(rule.factory):
                raise TypeError(
                    f"rule {shown(rule.name)}: a UDP listener's target must be a DatagramProtocol "
                    f"(UDPProxy or your own), got {shown(rule.factory)}"
                )
        if on_no_match is not None and not is_datagram_target(on_no_match):
            on_no_match = None
        check_unique_names(rules)
        if self._started:
            self._start_targets([*(r.factory for r in rules), *([on_no_match] if on_no_match is not None else [])])
        self.rules = tuple(rules)
        self.on_no_match = on_no_match
        if self._started:
            current = {id(t) for t in self._all_targets()}
            for key in [k for k in self._targets if k not in current and k not in self._live]:
                self._stop_target(key)

    def _stop_target(self, key: int) -> None:
        """Stop a target and forget it (a reload retired it, or the rules it came with could not start)."""
        target = self._targets.pop(key)
        try:
            target.doStop()
        except Exception:
            log.failure("target {target!r} raised when stopped", target=target)

    def _all_targets(self) -> list[AbstractDatagramProtocol]:
        found: list[Any] = [r.factory for r in self.rules]
        if self.on_no_match is not None:
            found.append(self.on_no_match)
        return found

    def _start_targets(self, targets: Sequence[Any]) -> None:
        """Start those of ``targets`` not started yet: all of them, or (stopping those started) none."""
        started: list[Any] = []
        try:
            for target in targets:
                if id(target) in self._targets:
                    continue
                if target.transport is not None:
                    raise ValueError(
                        f"{shown(target)} already has a transport: a DatagramProtocol target serves one listener; "
                        "build one per listener"
                    )
                try:
                    target.makeConnection(_TargetTransport(self, target))
                except BaseException:
                    target.transport = None
                    raise
                self._targets[id(target)] = target
                started.append(target)
        except BaseException:
            for target in started:
                self._stop_target(id(target))
            raise

    def doStart(self) -> None:
        """Start the targets (counted: the listening socket and ``MuxService`` both call this)."""
        self._started += 1
        if self._started == 1:
            self._start_targets(self._all_targets())

    def doStop(self) -> None:
        """On the last stop, end every flow and stop the targets."""
        if self._started == 0:
            return
        self._started -= 1
        if self._started:
            return
        self.abort_all()
        for target in self._targets.values():
            target.doStop()
        self._targets.clear()
        self._log_throttle.flush()

    def listening(self, port: Any) -> None:
        self.port = port
        self.host = port.getHost()
        # Replies go straight to the socket: Twisted's Port.write checks the
        # address's syntax on every call, and a flow's address came from
        # recvfrom, so it is already right.
        self._sendto = port.getHandle().sendto
        self.doStart()

    def not_listening(self) -> None:
        self.abort_all()
        self.port = None
        self.doStop()

    # --- the MuxService face (a listener's "factory") ----------------------

    @property
    def connections(self) -> list[Flow]:
        """The live flows."""
        return list(self.table.flows.values())

    def abort_sniffing(self) -> None:
        """End every flow still being sniffed."""
        for flow in [f for f in self.table.flows.values() if f.sniffing]:
            self._end(flow, "aborted_while_sniffing", "stopped")

    def abort_all(self) -> None:
        """End every flow (the listening socket is closing)."""
        self.abort_sniffing()
        for flow in list(self.table.flows.values()):
            self._end(flow, "handed_off", "stopped")

    def when_idle(self) -> defer.Deferred[None]:
        """Fires at once: a flow cannot outlive its listening socket, which a stop closes first."""
        return defer.succeed(None)

    # --- datagrams in ------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        flow = self.table.flows.get(addr)
        if flow is not None:
            target = flow.target
            if target is not None:
                flow.datagrams_in += 1
                flow.bytes_in += len(data)
                flow.last = self._reactor.seconds()
                try:
                    target.datagramReceived(data, addr)
                except Exception:
                    log.failure("target of rule {rule} raised in datagramReceived", rule=flow.rule)
                return
            self._sniff(flow, data)
            return
        self._new_flow(data, addr)

    def _new_flow(self, data: bytes, addr: Any) -> None:
        now = self._reactor.seconds()
        addr = (addr[0], addr[1])
        table = self.table
        stats = self.stats
        if table.is_unmatched(addr, now):
            stats.dropped["unmatched"] += 1
            return
        refusal, evicted = table.room_for(addr)
        for old in evicted:
            self._ended(old, "aborted_while_sniffing", "evicted")
        if refusal is not None:
            stats.dropped[refusal] += 1
            self.metrics.limit_rejected(refusal)
            return
        peer = (IPv6Address if ":" in addr[0] else IPv4Address)("UDP", addr[0], addr[1])
        flow = Flow(addr=addr, started=now, last=now, peer=peer, idle_timeout=self.flow_idle_timeout)
        table.add(flow)
        self._sniff(flow, data)

    def _sniff(self, flow: Flow, data: bytes) -> None:
        flow.held.append(data)
        flow.datagrams_in += 1
        flow.bytes_in += len(data)
        final = len(flow.held) >= self.max_sniff_datagrams or flow.bytes_in >= self.max_sniff_bytes
        self._evaluate(flow, final=final)
        if flow.sniffing and flow.timer is None and self.table.flows.get(flow.addr) is flow:
            flow.timer = self._reactor.callLater(self.sniff_timeout, self._sniff_timed_out, flow)

    def _sniff_timed_out(self, flow: Flow) -> None:
        flow.timer = None
        if flow.sniffing and self.table.flows.get(flow.addr) is flow:
            self._evaluate(flow, final=True, reason="sniff_timeout")

    def _evaluate(self, flow: Flow, final: bool, reason: str = "no_match") -> None:
        datagrams = tuple(flow.held)
        data = datagrams[0] if len(datagrams) == 1 else b"".join(datagrams)
        info = DatagramInfo(peer=flow.peer, local=self.host, datagrams=datagrams)
        for rule in self.rules:
            try:
                verdict = rule.matcher.match(data, info)
            except Exception:
                log.failure("matcher of rule {rule} raised; taken as NO_MATCH", rule=rule.name)
                verdict = NO_MATCH
            if verdict is MATCH:
                self._hand_off(flow, rule.name, rule.factory)
                return
            if verdict is NEED_MORE and not final:
                return
        if self.on_no_match is not None:
            self._hand_off(flow, "on_no_match", self.on_no_match)
            return
        if final and reason == "no_match":
            if len(datagrams) >= self.max_sniff_datagrams:
                reason = "max_sniff_datagrams"
            elif flow.bytes_in >= self.max_sniff_bytes:
                reason = "max_sniff_bytes"
        self._end(flow, "no_match", reason)
        self.table.remember_unmatched(flow.addr, self._reactor.seconds())

    def _hand_off(self, flow: Flow, rule: str, target: Any) -> None:
        now = self._reactor.seconds()
        if flow.timer is not None:
            flow.timer.cancel()
        flow.rule = rule
        flow.target = target
        flow.sniff_time = now - flow.started
        if IFlowTarget.providedBy(target) and target.idle_timeout is not None:
            flow.idle_timeout = target.idle_timeout
        self.table.handed_off(flow)
        self.stats.active[rule] = self.stats.active.get(rule, 0) + 1
        self._live[id(target)] = self._live.get(id(target), 0) + 1
        flow.timer = self._reactor.callLater(flow.idle_timeout, self._idle_check, flow)
        held, flow.held = flow.held, []
        for data in held:
            if flow.ended:
                break  # the target ended the flow during the replay
            try:
                target.datagramReceived(data, flow.addr)
            except Exception:
                log.failure("target of rule {rule} raised in datagramReceived", rule=rule)

    def _idle_check(self, flow: Flow) -> None:
        flow.timer = None
        left = flow.last + flow.idle_timeout - self._reactor.seconds()
        if left > 0:
            flow.timer = self._reactor.callLater(left, self._idle_check, flow)
        else:
            self._end(flow, "handed_off", "idle")

    # --- datagrams out -----------------------------------------------------

    def _send(self, target: Any, data: bytes, addr: Any) -> None:
        flow = self.table.flows.get(addr) if addr is not None else None
        if flow is None or flow.target is not target:
            if flow is None and addr is not None:
                flow = self.table.flows.get((addr[0], addr[1]))
            if flow is None or flow.target is not target:
                self.stats.dropped["not_a_flow"] += 1
                return
        if self.port is None:
            self.stats.dropped["not_listening"] += 1
            return
        try:
            self._sendto(data, flow.addr)
        except OSError as e:
            self._send_failed(flow, e)
            return
        flow.datagrams_out += 1
        flow.bytes_out += len(data)
        flow.last = self._reactor.seconds()

    def _send_failed(self, flow: Flow, error: OSError) -> None:
        self.stats.dropped["send_failed"] += 1
        log.warn("cannot send to {peer}: {problem}", peer=_address(flow.addr), problem=str(error))

    # --- the end of a flow -------------------------------------------------

    def end_flow(self, addr: Address, *, outcome: str = "handed_off", reason: str = "target") -> None:
        """End the live flow of ``addr``, if there is one."""
        flow = self.table.flows.get(addr)
        if flow is not None:
            self._end(flow, outcome, reason)

    def _end(self, flow: Flow, outcome: str, reason: str) -> None:
        if not self.table.remove(flow):
            return
        self._ended(flow, outcome, reason)

    def _ended(self, flow: Flow, outcome: str, reason: str) -> None:
        flow.ended = True
        if flow.timer is not None:
            if flow.timer.active():
                flow.timer.cancel()
            flow.timer = None
        target = flow.target
        stats = self.stats
        if target is not None:
            stats.active[flow.rule] -= 1
            if IFlowTarget.providedBy(target):
                try:
                    target.flow_ended(flow.addr)
                except Exception:
                    log.failure("target of rule {rule} raised in flow_ended", rule=flow.rule)
            key = id(target)
            left = self._live.get(key, 1) - 1
            if left > 0:
                self._live[key] = left
            else:
                self._live.pop(key, None)
                if key in self._targets and all(t is not target for t in self._all_targets()):
                    self._stop_target(key)
        now = self._reactor.seconds()
        rule = flow.rule or "-"
        sniff_time = flow.sniff_time if flow.sniff_time is not None else now - flow.started
        stats.flow_ended(rule, outcome, flow)
        self.metrics.connection_ended(rule, outcome, sniff_time, flow.bytes_in if target is None else 0, 0)
        if not self.log_connections:
            return
        suppressed = 0
        if flow.datagrams_out == 0 and (target is None or outcome == "rejected"):
            # Flows that got nothing back cost a sender with a spoofed
            # source one datagram each: their lines are throttled (the
            # metrics still count every one).
            local_port = getattr(self.host, "port", None)
            admitted = self._log_throttle.admit((outcome, reason), (flow.addr, local_port, rule, outcome, reason))
            if admitted is None:
                return
            suppressed = admitted
        log.info(
            "udp flow {peer} -> port {local_port} ended: {outcome} ({reason}), rule {rule}, "
            "{datagrams_in} datagrams / {bytes_in} bytes in, {datagrams_out} / {bytes_out} out, {duration:.3f}s"
            + (" ({suppressed} more like it not logged since the last line)" if suppressed else ""),
            log_event="connection_end",
            suppressed=suppressed,
            transport="udp",
            peer=_address(flow.addr),
            local_port=getattr(self.host, "port", None),
            rule=rule,
            outcome=outcome,
            reason=reason,
            sniff_time=sniff_time,
            datagrams_in=flow.datagrams_in,
            bytes_in=flow.bytes_in,
            datagrams_out=flow.datagrams_out,
            bytes_out=flow.bytes_out,
            duration=now - flow.started,
        )


def _ends_tail(held: tuple[Address, Any, str, str, str], suppressed: int) -> None:
    """The line of a burst's flows left out, once the burst stopped: how many, and the last one's remote."""
    addr, local_port, rule, outcome, reason = held
    log.info(
        "{suppressed} more udp flows to port {local_port} ended: {outcome} ({reason}),"
        " not logged since the last line (the last: {peer}, rule {rule})",
        log_event="connection_end_suppressed",
        suppressed=suppressed,
        transport="udp",
        peer=_address(addr),
        local_port=local_port,
        rule=rule,
        outcome=outcome,
        reason=reason,
    )


def _address(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
