"""
``twistd muxtwist``: command-line options and the service they make.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from twisted.application.service import IService
from twisted.internet.protocol import Factory
from twisted.logger import ILogObserver, jsonFileLogObserver
from twisted.python import usage

from muxtwist._checks import probe_listen, same_address, twistd_option_hint
from muxtwist._options import shown
from muxtwist._signals import hold_sighup
from muxtwist._textlog import text_log_observer, use_twistd_options
from muxtwist._twisted import remove_twistd_pidfile, tell_twistd_parent
from muxtwist._worker_limits import workers_problem
from muxtwist.config import ConfigError, Settings, build_factory, check_endpoint, endpoint_description, load_config
from muxtwist.service import MuxService, wanted_listeners
from muxtwist.udp.listener import is_udp, probe_udp_listeners, udp_listeners_problem

__all__ = ["Options", "makeService"]

#: Said after an option error under twistd, in place of twistd's whole help text.
HELP_HINT = "see twistd muxtwist --help"


def _count(value: str) -> int:
    """``--workers``'s value: a whole number (its lower bound is checked in ``postOptions``)."""
    try:
        return int(value)
    except ValueError:
        # usage.CoerceParameter would say "Parameter type enforcement failed", naming no option.
        raise usage.UsageError(f"--workers must be a whole number, got {shown(value)}") from None


class Options(usage.Options):
    """twistd -n muxtwist [--port PORT]... [--config rules.py] [--admin ENDPOINT] [--workers N] [--log-format json]"""

    synopsis = "[--port PORT]... [--config rules.py] [--admin ENDPOINT] [--workers N] [--log-format text|json]"
    longdesc = (
        "Serve many protocols on one port: each new connection is sniffed and handed to the first "
        "rule that matches. With no --config, HTTP gets a status page and anything else an echo service."
    )
    optParameters = [
        ["config", "c", None, "The rules file (plain Python defining rules and/or listeners)."],
        ["admin", None, None, "Serve /metrics and /ready on this endpoint (a port number or a description)."],
        ["workers", None, 1, "Serve with this many worker processes sharing the listening sockets.", _count],
        ["log-format", None, "text", "text (readable, the default) or json (one JSON object a line, on stdout)."],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["port"] = []
        self["inherit"] = {}

    def opt_inherit(self, value: str) -> None:
        """(internal) FD=DESCRIPTION: a listening socket made by the --workers parent."""
        fd, _, description = value.partition("=")
        if not fd.isdigit() or not description:
            raise usage.UsageError(f"--inherit wants FD=DESCRIPTION, got {shown(value)}")
        self["inherit"][endpoint_description(description)] = int(fd)

    def opt_port(self, value: str) -> None:
        """A port number or an endpoint description (tcp:3000:interface=127.0.0.1, unix:..., ssl:...); repeatable."""
        description = endpoint_description(value)
        try:
            check_endpoint(description)
        except ValueError as e:
            raise SystemExit(f"muxtwist: --port: {e}") from None
        self["port"].append(description)

    opt_p = opt_port

    def parseOptions(self, options: Any = None) -> None:
        """
        Parse the options; under twistd, a mistake is one line on stderr.

        twistd answers a UsageError with its whole help text before the
        error (twisted.application.app.run prints the options first), so
        that the one line saying what is wrong scrolls out of sight. Under
        twistd (a parent), a UsageError is therefore turned into that line
        and a pointer to ``--help``, as SystemExit, which twistd lets
        through. Without a parent (muxtwist's own code, tests) it is raised
        as it is.
        """
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
        except usage.UsageError as e:
            hint = twistd_option_hint(str(e))
            if hint is not None:
                raise SystemExit(f"muxtwist: {hint}") from None
            if self.parent is None:
                raise
            raise SystemExit(f"muxtwist: {e} ({HELP_HINT})") from None

    def postOptions(self) -> None:
        if self.parent is not None:
            # Under twistd: from here on a SIGHUP during start-up (loading a
            # slow rules file, say) is kept for later, not fatal.
            hold_sighup()
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError(f"--log-format must be text or json, got {shown(self['log-format'])}")
        # A --logger given to twistd, as given (twistd imports it later): the
        # workers of --workers are given it too.
        self["twistd-logger"] = self.parent.get("logger") if self.parent is not None else None
        if self["log-format"] == "json" and self.parent is not None:
            # twistd builds its log observer from its own --logger option
            # after all options are parsed; this is where ours goes in.
            self.parent["logger"] = "muxtwist.tap.json_log_observer"
        elif self.parent is not None and self.parent.get("logger") is None and not self.parent.get("syslog"):
            # twistd's own text log, to the same file, formatted for less
            # (muxtwist._textlog); a --logger or --syslog given is kept.
            use_twistd_options(self.parent)
            self.parent["logger"] = "muxtwist._textlog.text_log_observer"
        if self["workers"] < 1:
            raise usage.UsageError(f"--workers must be at least 1, got {shown(self['workers'])}")
        if self["admin"] is not None:
            self["admin"] = endpoint_description(self["admin"])
            try:
                check_endpoint(self["admin"])
            except ValueError as e:
                raise usage.UsageError(f"--admin: {e}") from None
        self["loaded"] = None
        if self["config"] is not None:
            try:
                self["loaded"] = load_config(self["config"])
            except ConfigError as e:
                raise SystemExit(f"muxtwist: {e}") from None
            if self["loaded"].rules is None and self["port"]:
                raise SystemExit(f"muxtwist: {self['config']}: --port given, but the file defines no 'rules'")
        udp = [p for p in self["port"] if is_udp(p)]
        if self["loaded"] is not None:
            udp += [d for d in self["loaded"].listeners if is_udp(d)]
        if udp and (self["loaded"] is None or self["workers"] > 1):
            why = "--workers is TCP only" if self["loaded"] is not None else "the built-in rules are TCP: give --config"
            raise usage.UsageError(f"cannot serve {', '.join(udp)}: {why}")
        if udp and (problem := udp_listeners_problem(wanted_listeners(self["loaded"], tuple(self["port"])))):
            raise SystemExit(f"muxtwist: {self['config']}: {problem}")
        if not self["inherit"]:
            # Here, before twistd detaches, so that the error reaches the terminal in daemon mode too.
            wanted = (
                list(self["port"] or ["tcp:3000"])
                if self["loaded"] is None
                else list(wanted_listeners(self["loaded"], tuple(self["port"])))
            )
            problem = workers_problem(self["workers"], wanted, admin=self["admin"] is not None)
            if problem is not None:
                raise usage.UsageError(problem)
            admin = self["admin"]
            clash = next((d for d in wanted if admin is not None and same_address(d, admin)), None)
            if clash is not None:
                raise SystemExit(
                    f"muxtwist: --admin {admin} takes the address of the listener {clash}: give --admin another one"
                )
            for description in [*wanted, *([self["admin"]] if self["admin"] is not None else [])]:
                reason = probe_listen(description)
                if reason is not None:
                    what = "--admin: " if description == self["admin"] and description not in wanted else ""
                    raise SystemExit(f"muxtwist: {what}cannot listen on {description}: {reason}")
            busy = probe_udp_listeners([d for d in wanted if is_udp(d)])
            if busy is not None:
                raise SystemExit(f"muxtwist: cannot listen on {busy[0]}: {busy[1]}")


def json_log_observer() -> ILogObserver:
    """Every log event as one JSON object a line on stdout (``--log-format json``)."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")


def _worker_args(options: Options) -> list[str]:
    args: list[str] = []
    if options["config"] is not None:
        args += ["--config", options["config"]]
    for port in options["port"]:
        args += ["--port", port]
    # No --admin: each worker serves its own numbers on a private socket and
    # the parent serves the admin endpoint, summing them (muxtwist.workers).
    return [*args, "--log-format", options["log-format"]]


def _start_failed(twistd_options: Any, problem: str) -> None:
    """The worker pool cannot start: what twistd does for a start that raised, which it skips for SystemExit."""
    remove_twistd_pidfile(twistd_options)
    tell_twistd_parent(twistd_options, problem)


def _workers(options: Options) -> IService:
    from muxtwist.workers import WorkerPool

    config = options["loaded"]
    ports = tuple(options["port"])
    if config is None:
        descriptions = list(ports or ("tcp:3000",))
    else:
        descriptions = list(wanted_listeners(config, ports))
    twistd_args: list[str] = []
    parent: Any = options.parent
    # With muxtwist's text log, the workers' lines go through this process to
    # its one file. A --syslog or --logger given to twistd is the workers'
    # too (else a daemon's workers would log to its /dev/null); otherwise
    # each worker opens the --logfile itself. JSON: --log-format, below.
    relay_log = parent is not None and parent.get("logger") is text_log_observer
    if parent is None or relay_log or parent.get("logger") is json_log_observer:
        pass
    elif isinstance(options.get("twistd-logger"), str):  # twistd itself prefers it to --syslog
        twistd_args.append(f"--logger={options['twistd-logger']}")
    elif parent.get("syslog"):
        twistd_args += ["--syslog", f"--prefix={parent.get('prefix') or 'twisted'}"]
    elif parent.get("logfile") and parent["logfile"] != "-":
        twistd_args.append(f"--logfile={parent['logfile']}")
    if parent is not None and parent.get("reactor"):
        # Workers run the reactor twistd was given (ASGI targets need asyncio's).
        twistd_args.append(f"--reactor={parent['reactor']}")
    stop_timeout = (config.settings.shutdown_timeout if config is not None else 30.0) + 5.0
    try:
        return WorkerPool(
            options["workers"],
            descriptions,
            _worker_args(options),
            twistd_args=twistd_args,
            relay_log=relay_log,
            stop_timeout=stop_timeout,
            admin=options["admin"],
            # twistd --uid/--gid: the user the workers will run as.
            uid=parent.get("uid") if parent is not None else None,
            gid=parent.get("gid") if parent is not None else None,
            # As twistd does for other errors: no pid file left, and a daemon's terminal shows why.
            start_failed=functools.partial(_start_failed, parent),
        )
    except ValueError as e:
        raise SystemExit(f"muxtwist: {e}") from None


def makeService(options: Options) -> IService:
    """The :class:`MuxService` for these options (a pool of workers with ``--workers`` above 1)."""
    hold_sighup()
    if options["workers"] > 1 and not options["inherit"]:
        return _workers(options)
    ports = tuple(options["port"])
    inherited = dict(options["inherit"])
    admin = options["admin"]
    admin_fd = inherited.pop(admin, None) if admin is not None else None
    service = MuxService(config_path=options["config"], ports=ports, handle_signals=True, inherited=inherited)
    if admin is not None:
        service.set_admin(admin, inherited_fd=admin_fd)
    config = options["loaded"]
    if config is None:
        from muxtwist.default import Echo, default_rules

        factory = build_factory(default_rules(service), Settings(on_timeout=Factory.forProtocol(Echo)))
        for port in ports or ("tcp:3000",):
            service.add_listener(port, factory)
    else:
        service.load(config)
    return service
