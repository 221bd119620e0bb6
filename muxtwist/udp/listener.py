"""
UDP listeners for ``MuxService`` and ``twistd muxtwist``: the
``udp:PORT[:interface=ADDR]`` and ``udp6:PORT[:interface=ADDR]``
descriptions, and :class:`UDPListener`, the service that listens on one.
"""

from __future__ import annotations

import errno
import inspect
import socket
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from muxtwist._options import shown
from muxtwist._reload_lines import cannot_listen, listen_again, serve_on
from muxtwist.udp.mux import MAX_DATAGRAM, UDPMux, is_datagram_target
from muxtwist.udp.proxy import _fields

if TYPE_CHECKING:
    from muxtwist.metrics import Metrics
    from muxtwist.sniffing import Rule

__all__ = [
    "UDPAddress",
    "UDPListener",
    "add_udp_listener",
    "build_udp_mux",
    "is_udp",
    "parse_udp_description",
    "probe_udp_listeners",
    "reload_udp_listeners",
    "udp_listeners",
    "udp_listeners_problem",
    "udp_target_problem",
]

log = Logger()


class Settings(Protocol):
    """
    What a UDP listener reads of a rules file's settings (a
    :class:`~muxtwist.config.Settings`; typed here so that this module, which
    the config loader imports, does not import it back), besides the UDP
    ones :func:`udp_settings` reads.
    """

    @property
    def sniff_timeout(self) -> float: ...

    @property
    def max_sniff_bytes(self) -> int: ...

    @property
    def log_connections(self) -> bool: ...


def is_udp(description: str) -> bool:
    """Whether an endpoint description is a UDP listener's."""
    return description.startswith(("udp:", "udp6:"))


@attrs.frozen
class UDPAddress:
    """Where a UDP listener listens."""

    port: int
    interface: str


def parse_udp_description(description: str) -> UDPAddress:
    """
    ``udp:443``, ``udp:443:interface=127.0.0.1``, ``udp:port=443``,
    ``udp6:443:interface=\\:\\:1`` (IPv6 colons escaped, as in Twisted's
    endpoint strings; ``udp6`` listens on ``::`` by default).

    :raises ValueError: anything else, with what is wrong.
    """
    kind, rest = description.split(":", 1) if ":" in description else (description, "")
    if kind not in ("udp", "udp6") or not rest:
        raise ValueError(f"bad UDP listener {description!r}: want udp:PORT[:interface=ADDRESS]")
    first, _, tail = rest.partition(":")
    if first.isdigit():
        rest = f"port={first}" + (f":{tail}" if tail else "")
    try:
        _, fields = _fields(f"{kind}:{rest}")
    except ValueError:
        hint = ""
        if "interface=" in rest and rest.partition("interface=")[2].count(":") > 1:
            hint = " (an IPv6 address's colons are escaped: udp6:PORT:interface=\\:\\:1)"
        raise ValueError(f"bad UDP listener {description!r}: want udp:PORT[:interface=ADDRESS]{hint}") from None
    unknown = set(fields) - {"port", "interface"}
    if unknown:
        raise ValueError(f"bad UDP listener {description!r}: unknown option(s) {', '.join(sorted(unknown))}")
    try:
        port = int(fields["port"])
    except (KeyError, ValueError):
        raise ValueError(f"bad UDP listener {description!r}: no port number") from None
    if not 0 <= port < 65536:
        raise ValueError(f"bad UDP listener {description!r}: port {port} out of range")
    interface = fields.get("interface", "::" if kind == "udp6" else "")
    if kind == "udp6" and ":" not in interface:
        raise ValueError(f"bad UDP listener {description!r}: udp6 wants an IPv6 interface")
    return UDPAddress(port, interface)


def build_udp_mux(
    rules: Sequence[Rule], settings: Settings, reactor: Any = None, metrics: Metrics | None = None
) -> UDPMux:
    """
    A :class:`UDPMux` for ``rules`` with a rules file's settings
    (``sniff_timeout`` and the UDP ones), counting into ``metrics`` if given.
    """
    return UDPMux(
        rules,
        metrics=metrics,
        sniff_timeout=settings.sniff_timeout,
        max_sniff_bytes=settings.max_sniff_bytes,
        log_connections=settings.log_connections,
        **udp_settings(settings),
        reactor=reactor,
    )


_UDP_SETTINGS = ("max_udp_flows", "max_flows_per_source", "max_sniff_datagrams")
#: What a listener built without a UDP setting uses for it (UDPMux's defaults).
_UDP_DEFAULTS: dict[str, Any] = {n: inspect.signature(UDPMux).parameters[n].default for n in _UDP_SETTINGS}


def udp_settings(settings: object) -> dict[str, Any]:
    """The UDP settings a :class:`~muxtwist.config.Settings` carries (none if it predates them)."""
    return {n: getattr(settings, n) for n in _UDP_SETTINGS if getattr(settings, n, None) is not None}


class UDPListener(Service):
    """
    One UDP listening socket and the :class:`UDPMux` behind it; a child of
    ``MuxService`` like the TCP listeners (``factory`` is the mux).
    """

    def __init__(self, description: str, factory: UDPMux, reactor: Any) -> None:
        self.description = description
        self.address = parse_udp_description(description)
        self.factory = factory
        self._reactor = reactor
        self.port: Any = None
        self.setName(description)  # type: ignore[no-untyped-call]

    def privilegedStartService(self) -> None:
        # Bind here, before twistd drops privileges (port 443).
        if self.port is None:
            self.port = self._reactor.listenUDP(
                self.address.port, self.factory.protocol, interface=self.address.interface, maxPacketSize=MAX_DATAGRAM
            )
            log.info(
                "listening on {description} at {address}", description=self.description, address=self.port.getHost()
            )
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)


def udp_target_problem(description: str, rules: Sequence[Rule]) -> str | None:
    """What is wrong with ``rules`` for the listener ``description`` (``None`` if nothing)."""
    for i, rule in enumerate(rules):
        if is_udp(description) and not is_datagram_target(rule.factory):
            return (
                f"listeners[{shown(description)}][{i}] (rule {shown(rule.name)}): a UDP listener's target must be a "
                f"DatagramProtocol (UDPProxy or your own), got {shown(rule.factory)}"
            )
        if not is_udp(description) and is_datagram_target(rule.factory):
            return (
                f"rule {shown(rule.name)} on {shown(description)}: a DatagramProtocol target serves only UDP listeners "
                "(udp:PORT); give TCP listeners a factory"
            )
    return None


def udp_listeners_problem(wanted: Mapping[str, Sequence[Rule]]) -> str | None:
    """
    What keeps the UDP listeners of ``wanted`` (description -> rules) from
    all listening (``None`` if nothing): one ``DatagramProtocol`` target
    given to two of them (a target serves one listener: its transport is
    that listener's socket), or two descriptions of one address.
    """
    owners: dict[int, tuple[str, str]] = {}
    addresses: dict[UDPAddress, str] = {}
    for description, rules in wanted.items():
        if not is_udp(description):
            continue
        address = parse_udp_description(description)
        if address in addresses:
            return f"listeners {shown(addresses[address])} and {shown(description)} are the same address; keep one"
        addresses[address] = description
        for rule in rules:
            first = owners.setdefault(id(rule.factory), (description, rule.name))
            if first[0] != description:
                return (
                    f"rule {shown(rule.name)} of {shown(description)} has the same target as rule {shown(first[1])} of "
                    f"{shown(first[0])} ({shown(rule.factory)}); a DatagramProtocol target serves one listener: "
                    "build one per listener"
                )
    return None


def probe_udp_listeners(descriptions: Sequence[str]) -> tuple[str, str] | None:
    """
    The first of the UDP listener ``descriptions`` that cannot listen right
    now, with why: ``(description, reason)``, or ``None`` if all can. Each is
    bound as the listener binds it and held until the last is bound, so a
    port another process holds and two listeners that would take the same
    address (``udp:53`` and ``udp:53:interface=127.0.0.1``) are both found;
    all are closed before returning. Port 0 (any free port) is not probed.
    """
    held: list[socket.socket] = []
    try:
        for description in descriptions:
            address = parse_udp_description(description)
            if not address.port:
                continue
            family = socket.AF_INET6 if description.startswith("udp6:") or ":" in address.interface else socket.AF_INET
            probe = socket.socket(family, socket.SOCK_DGRAM)
            held.append(probe)
            try:
                probe.bind((address.interface, address.port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return description, "the address is already in use (another server, or another listener here)"
                return description, e.strerror or str(e)
        return None
    finally:
        for probe in held:
            probe.close()


def udp_listeners(service: Any) -> dict[str, UDPListener]:
    """The UDP listeners among ``service``'s children, by description."""
    return {s.description: s for s in service if isinstance(s, UDPListener)}


def add_udp_listener(service: Any, description: str, rules: Sequence[Rule], settings: Settings) -> UDPListener:
    """Serve ``rules`` on the UDP listener ``description`` as a child of ``service`` (a ``MuxService``)."""
    mux = build_udp_mux(rules, settings, service._reactor, service.metrics)  # the service's metrics count its flows
    listener = UDPListener(description, mux, service._reactor)
    _start(service, listener)
    return listener


def _rename(service: Any, listener: UDPListener, description: str) -> None:
    """Give a running listener a new description (the same address written another way)."""
    del service.namedServices[listener.name]
    listener.name = listener.description = description
    service.namedServices[description] = listener


def _in_the_way(old: UDPListener, new: UDPListener) -> bool:
    """
    Whether ``old`` may hold the address ``new`` binds, so that it must close
    before ``new`` can listen: the same port number other than 0, whatever
    the interfaces (``udp:53:interface=127.0.0.1`` and ``udp:53`` cannot
    both bind).
    """
    return old.address.port == new.address.port != 0


def _start(service: Any, listener: UDPListener) -> None:
    """Start ``listener`` as a child of ``service``; raise, keeping nothing of it, if it cannot listen."""
    try:
        listener.setServiceParent(service)  # type: ignore[no-untyped-call]
    except BaseException:
        # A listener that could not listen is not kept: a later reload sees it missing and tries again.
        listener.disownServiceParent()  # type: ignore[no-untyped-call]
        raise


def _close(listeners: Sequence[UDPListener]) -> defer.Deferred[list[None]]:
    """Close the sockets of ``listeners`` (their flows end); fires once all are closed."""
    return defer.gatherResults([defer.maybeDeferred(old.disownServiceParent) for old in listeners])


def _listen_again(service: Any, old: UDPListener) -> None:
    """
    Listen on the description of ``old``, a listener a reload closed for a
    new one on its port that then could not listen, with its mux (its
    running rules and settings).
    """

    def start() -> None:
        _start(service, UDPListener(old.description, old.factory, service._reactor))

    listen_again(log, old.description, start)


def reload_udp_listeners(service: Any, wanted: dict[str, Sequence[Rule]], settings: Settings) -> defer.Deferred[bool]:
    """
    A reload for the UDP listeners: new rules for those that stay (live flows
    keep their targets), new ones started, then gone ones closed.

    A listener whose description changes but not its address (``udp:53`` and
    ``udp:port=53``) keeps its socket and flows. Listeners that appear bind
    first; those that disappear close only once every one that appears
    listens. When one cannot listen (its port is taken, say), it is logged,
    left out and tried again at the next reload, and every listener that was
    to disappear serves on with its running rules and settings; the next
    reload that starts them all closes them. A listener whose address changes
    but not its port (``udp:53:interface=127.0.0.1`` to ``udp:53``) cannot
    bind beside the old one: the old socket is closed first (its flows end),
    then the new one listens; if it cannot, the old description listens
    again with its running rules (logged), so that the port is not lost.

    :returns: a Deferred that fires, once the new listeners listen and the
        old sockets are closed, with whether the reload fully took effect.
    """
    return defer.Deferred.fromCoroutine(_reload(service, wanted, settings))


async def _reload(service: Any, wanted: dict[str, Sequence[Rule]], settings: Settings) -> bool:
    current = udp_listeners(service)
    gone = set(current) - set(wanted)
    for description in sorted(set(wanted) - set(current)):
        address = parse_udp_description(description)
        same = next((d for d in sorted(gone) if current[d].address == address), None)
        if same is not None:
            gone.discard(same)
            kept = current.pop(same)
            _rename(service, kept, description)
            current[description] = kept
    ok = True
    for description, rules in wanted.items():
        listener = current.get(description)
        if listener is None:
            continue
        try:
            mux = listener.factory
            mux.sniff_timeout = settings.sniff_timeout
            mux.max_sniff_bytes = settings.max_sniff_bytes
            mux.log_connections = settings.log_connections
            # A setting the file no longer gives goes back to a new listener's value.
            for name, value in {**_UDP_DEFAULTS, **udp_settings(settings)}.items():
                if name == "max_udp_flows":
                    mux.table.max_flows = value
                elif name == "max_flows_per_source":
                    mux.table.max_flows_per_source = value
                else:
                    setattr(mux, name, value)
            mux.set_rules(rules)
        except Exception as e:
            ok = False
            log.error("reload: cannot serve {description}: {problem}", description=description, problem=str(e))
    failed: list[str] = []
    new: list[UDPListener] = []
    for description, rules in wanted.items():
        if description in current:
            continue
        try:
            mux = build_udp_mux(
                rules, settings, service._reactor, service.metrics
            )  # the service's metrics count its flows
            new.append(UDPListener(description, mux, service._reactor))
        except Exception as e:
            cannot_listen(log, description, e)
            failed.append(description)
    old = [current[d] for d in sorted(gone)]
    # Old sockets that a new listener needs close first.
    first = [each for each in old if any(_in_the_way(each, listener) for listener in new)]
    await _close(first)
    if service.draining:
        # A stop began while they closed: nothing more listens.
        log.info("reload: the service is stopping; no new UDP listener starts")
        return False
    started: list[UDPListener] = []
    for listener in new:
        try:
            _start(service, listener)
        except Exception as e:
            cannot_listen(log, listener.description, e)
            failed.append(listener.description)
        else:
            started.append(listener)
    for each in first:
        if not any(_in_the_way(each, listener) for listener in started):
            _listen_again(service, each)
    rest = [each for each in old if each not in first]
    if failed:
        if rest:
            serve_on(log, [each.description for each in rest])
        return False
    await _close(rest)
    return ok
