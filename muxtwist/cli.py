"""
``python -m muxtwist``: tools for people writing rules.

- ``check rules.py``: load and validate the file, print its listeners,
  rules and settings; the exit code says whether it is usable.
- ``explain rules.py (--hex HEX | --file CAPTURE)``: each rule's verdict on
  those bytes, in order, and which rule would get the connection, and why,
  without sending anything anywhere.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from muxtwist.config import Config, ConfigError, Settings, load_config
from muxtwist.interfaces import ConnectionInfo
from muxtwist.service import wanted_listeners
from muxtwist.sniffing import Rule
from muxtwist.testing import route

__all__ = ["main"]


def _factory_name(factory: object) -> str:
    text = repr(factory)
    if text.startswith("<") and " object at 0x" in text:
        return type(factory).__name__
    return text


def _short(text: str, width: int = 100) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _describe_rule(rule: Rule) -> str:
    limit = f"  (max_connections={rule.max_connections})" if rule.max_connections is not None else ""
    return f"{rule.name}: {_short(repr(rule.matcher))} -> {_short(_factory_name(rule.factory))}{limit}"


def _print_settings(settings: Settings, out: TextIO) -> None:
    defaults = Settings()
    print("settings:", file=out)
    for field in ("sniff_timeout", "max_sniff_bytes", "max_connections", "max_connections_per_source",
                  "shutdown_timeout", "accept_proxy_protocol", "on_timeout", "on_no_match"):  # fmt: skip
        value = getattr(settings, field)
        mark = "" if value != getattr(defaults, field) else "  (default)"
        shown = _factory_name(value) if field.startswith("on_") and value is not None else repr(value)
        print(f"  {field} = {shown}{mark}", file=out)


def check(path: str, ports: Sequence[str], out: TextIO, err: TextIO) -> int:
    """Load ``path`` and print what it would serve; 0 if good, 1 if not."""
    try:
        config = load_config(path)
    except ConfigError as e:
        print(f"muxtwist: {e}", file=err)
        return 1
    if config.rules is None and ports:
        print(f"muxtwist: {path}: --port given, but the file defines no 'rules'", file=err)
        return 1
    print(f"{path}: OK", file=out)
    for description, rules in wanted_listeners(config, tuple(ports)).items():
        print(f"listener {description}:", file=out)
        for i, rule in enumerate(rules, 1):
            print(f"  {i}. {_describe_rule(rule)}", file=out)
    _print_settings(config.settings, out)
    return 0


def _rules_for(config: Config, listener: str | None) -> tuple[Rule, ...]:
    wanted = wanted_listeners(config, ())
    if listener is not None:
        from muxtwist.config import endpoint_description

        key = endpoint_description(listener)
        if key not in wanted:
            raise ValueError(f"no listener {key!r}; the file has: {', '.join(wanted) or 'none'}")
        return wanted[key]
    if config.rules is not None:
        return config.rules
    return next(iter(wanted.values()))


def explain(path: str, data: bytes, listener: str | None, final: bool, out: TextIO, err: TextIO) -> int:
    """Print each rule's verdict on ``data`` and the winner; 0 if a rule wins, 2 if none does, 1 on errors."""
    try:
        config = load_config(path)
        rules = _rules_for(config, listener)
    except (ConfigError, ValueError) as e:
        print(f"muxtwist: {e}", file=err)
        return 1
    shown = data[:64]
    print(f"{len(data)} bytes: {shown!r}{'...' if len(data) > 64 else ''}", file=out)
    if len(data) >= config.settings.max_sniff_bytes:
        final = True
        print(f"(at least max_sniff_bytes={config.settings.max_sniff_bytes}: this is the final evaluation)", file=out)
    result = route(rules, data[: config.settings.max_sniff_bytes], ConnectionInfo(), final=final)
    for i, rule in enumerate(rules):
        if i < len(result.verdicts):
            print(f"  {i + 1}. {rule.name}: {result.verdicts[i][1].name}", file=out)
        else:
            print(f"  {i + 1}. {rule.name}: not evaluated (an earlier rule decided)", file=out)
    if result.rule is not None:
        print(f"winner: {result.rule.name} -> {_short(_factory_name(result.rule.factory))}", file=out)
    else:
        print("winner: none yet" if not final and "needs more" in result.reason else "winner: none", file=out)
    print(f"why: {result.reason}", file=out)
    if result.rule is None and not final and "needs more" in result.reason:
        then = route(rules, data, ConnectionInfo(), final=True)
        where = then.name or ("on_timeout" if not data else "on_no_match")
        print(f"if the client sends nothing more (timeout or end of stream): {where} ({then.reason})", file=out)
    return 0 if result.rule is not None else 2


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The ``python -m muxtwist`` command line; returns the exit code."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    parser = argparse.ArgumentParser(prog="python -m muxtwist", description="Tools for muxtwist rules files.")
    commands = parser.add_subparsers(dest="command", required=True)
    p_check = commands.add_parser("check", help="load and validate a rules file, print its listeners and rules")
    p_check.add_argument("rules", help="the rules file")
    p_check.add_argument("--port", action="append", default=[], help="a --port as twistd would get it (repeatable)")
    p_explain = commands.add_parser("explain", help="show where a connection sending these bytes would go")
    p_explain.add_argument("rules", help="the rules file")
    source = p_explain.add_mutually_exclusive_group(required=True)
    source.add_argument("--hex", help="the client's first bytes, in hex (spaces allowed)")
    source.add_argument("--file", help="a file holding the client's first bytes (a raw capture)")
    p_explain.add_argument("--listener", help="which listener's rules (default: the 'rules' list)")
    p_explain.add_argument(
        "--final", action="store_true", help="the client sent nothing more (end of stream or timeout)"
    )
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(args.rules, args.port, out, err)
    if args.hex is not None:
        try:
            data = bytes.fromhex(args.hex.replace(":", " "))
        except ValueError as e:
            print(f"muxtwist: --hex: {e}", file=err)
            return 1
    else:
        try:
            with open(args.file, "rb") as f:
                data = f.read()
        except OSError as e:
            print(f"muxtwist: --file: {e.strerror or e}", file=err)
            return 1
    return explain(args.rules, data, args.listener, args.final, out, err)
