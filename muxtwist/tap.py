"""
``twistd muxtwist``: command-line options and the service they make.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.internet.protocol import Factory
from twisted.python import usage

from muxtwist.config import ConfigError, Settings, build_factory, check_endpoint, endpoint_description, load_config
from muxtwist.service import MuxService

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    """twistd -n muxtwist [--port PORT]... [--config rules.py]"""

    synopsis = "[--port PORT]... [--config rules.py]"
    longdesc = (
        "Serve many protocols on one port: each new connection is sniffed and handed to the first "
        "rule that matches. With no --config, HTTP gets a status page and anything else an echo service."
    )
    optParameters = [
        ["config", "c", None, "The rules file (plain Python defining rules and/or listeners)."],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["port"] = []

    def opt_port(self, value: str) -> None:
        """
        A port number or an endpoint description (tcp:3000:interface=127.0.0.1,
        ssl:..., unix:..., systemd:...); repeatable.
        """
        description = endpoint_description(value)
        try:
            check_endpoint(description)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        self["port"].append(description)

    opt_p = opt_port

    def postOptions(self) -> None:
        self["loaded"] = None
        if self["config"] is not None:
            try:
                self["loaded"] = load_config(self["config"])
            except ConfigError as e:
                raise SystemExit(f"muxtwist: {e}") from None
            if self["loaded"].rules is None and self["port"]:
                raise SystemExit(f"muxtwist: {self['config']}: --port given, but the file defines no 'rules'")


def makeService(options: Options) -> IService:
    """The :class:`MuxService` for these options."""
    ports = tuple(options["port"])
    service = MuxService(config_path=options["config"], ports=ports, handle_signals=True)
    config = options["loaded"]
    if config is None:
        from muxtwist.default import Echo, default_rules

        factory = build_factory(default_rules(service), Settings(on_timeout=Factory.forProtocol(Echo)))
        for port in ports or ("tcp:3000",):
            service.add_listener(port, factory)
    else:
        service.load(config)
    return service
