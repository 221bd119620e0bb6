"""
``python -m muxtwist``: tools for people writing rules.

- ``check rules.py``: load and validate the file, print its listeners,
  rules and settings; the exit code says whether it is usable.
- ``explain rules.py (BYTES | @CAPTURE | - | --hex HEX | --file CAPTURE)``:
  each rule's verdict on those bytes, in order, and which rule would get the
  connection, and why, without sending anything anywhere. ``BYTES`` is text
  with Python escapes (``'GET / HTTP/1.1\\r\\n'``), ``@path`` a file, ``-``
  standard input.
- ``doctor rules.py``: for the file's transparent rules, what this host
  still needs (capability, policy routing, packet marking), as commands.
"""

from __future__ import annotations

import argparse
import codecs
import inspect
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import attrs

from muxtwist._checks import per_request_routing
from muxtwist._options import shown
from muxtwist.config import Config, ConfigError, Settings, load_config
from muxtwist.interfaces import ConnectionInfo, IMatcher
from muxtwist.service import wanted_listeners
from muxtwist.sniffing import Rule
from muxtwist.testing import route
from muxtwist.udp.listener import is_udp, udp_listeners_problem
from muxtwist.udp.mux import UDPMux

__all__ = ["main"]


def _factory_name(factory: object) -> str:
    text = shown(factory, 100)
    if text.startswith("<") and " object at 0x" in text:
        return type(factory).__name__
    return text


def _shown(value: object) -> str:
    """A converted option as its user would have written it: a one-item tuple as its item."""
    if isinstance(value, tuple) and len(value) == 1:
        return repr(value[0])
    return repr(value)


def _default_of(field: Any) -> object:
    default = field.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = None if default.takes_self else default.factory()
    return default


def user_repr(obj: object) -> str:
    """
    An attrs matcher shown as its user wrote it: only the options that differ
    from their defaults (``HTTP1(host='a.test')``, not the expanded set of
    every HTTP method), nested matchers the same way.
    """
    cls = type(obj)
    if not attrs.has(cls):
        return shown(obj, 100)
    args: list[str] = []
    for field in attrs.fields(cls):
        value = getattr(obj, field.name)
        if field.name == "matchers" and isinstance(value, tuple) and all(IMatcher.providedBy(m) for m in value):
            args += [user_repr(m) for m in value]
            continue
        if field.name == "matcher" and IMatcher.providedBy(value):
            args.append(user_repr(value))
            continue
        if not field.init:
            continue
        default = _default_of(field)
        if default is not attrs.NOTHING:
            if value == default:
                continue
            if field.converter is not None:
                try:
                    if value == field.converter(default):
                        continue
                except Exception:
                    pass
        elif field.name == "name":
            if value == cls.__name__.lower():
                continue
            # A combinator's name is derived from its inner matchers unless given.
            inner = getattr(obj, "matchers", None)
            inner = inner if isinstance(inner, tuple) else (getattr(obj, "matcher", None),)
            try:
                if getattr(cls(*inner), "name", None) == value:
                    continue
            except Exception:
                pass
        args.append(f"{field.alias or field.name}={_shown(value)}")
    return f"{cls.__name__}({', '.join(args)})"


def _short(text: str, width: int = 100) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _describe_rule(rule: Rule) -> str:
    limit = f"  (max_connections={rule.max_connections})" if rule.max_connections is not None else ""
    if getattr(rule.factory, "needs_asyncio_reactor", False):
        limit += "  (needs Twisted's asyncio reactor: twistd --reactor=asyncio muxtwist ...)"
    try:
        matcher = user_repr(rule.matcher)
    except Exception:
        matcher = shown(rule.matcher, 100)  # a matcher of the user's own whose fields cannot be read or compared
    return f"{rule.name}: {_short(matcher)} -> {_short(_factory_name(rule.factory))}{limit}"


#: What a UDP listener takes for a UDP setting the rules file leaves out: ``UDPMux``'s defaults.
_UDP_DEFAULTS = {
    name: inspect.signature(UDPMux).parameters[name].default
    for name in ("max_udp_flows", "max_flows_per_source", "max_sniff_datagrams")
}


def _print_settings(settings: Settings, out: TextIO, udp: bool = False) -> None:
    defaults = Settings()
    print("settings:", file=out)
    for field in ("sniff_timeout", "max_sniff_bytes", "max_connections", "max_connections_per_source",
                  "shutdown_timeout", "accept_proxy_protocol", "on_timeout", "on_no_match"):  # fmt: skip
        value = getattr(settings, field)
        mark = "" if value != getattr(defaults, field) else "  (default)"
        text = _factory_name(value) if field.startswith("on_") and value is not None else shown(value, 100)
        print(f"  {field} = {text}{mark}", file=out)
    if udp:
        for field, default in _UDP_DEFAULTS.items():
            value = getattr(settings, field)
            text = f"{default!r}  (default)" if value is None else shown(value, 100)
            print(f"  {field} = {text}", file=out)


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
    listeners = wanted_listeners(config, tuple(ports))
    if (problem := udp_listeners_problem(listeners)) is not None:
        print(f"muxtwist: {path}: {problem}", file=err)
        return 1
    misspelled = [w for w in config.warnings if w.kind == "misspelled"]
    print(f"{path}: {'OK' if not misspelled else 'loads, but see the warnings'}", file=out)
    for description, rules in listeners.items():
        print(f"listener {description}:", file=out)
        for i, rule in enumerate(rules, 1):
            print(f"  {i}. {_describe_rule(rule)}", file=out)
    _print_settings(config.settings, out, udp=any(is_udp(d) for d in listeners))
    for warning in config.warnings:
        print(f"warning: {warning}", file=err)
    seen: set[str] = set()
    for rules in listeners.values():
        for text in per_request_routing(rules):
            if text not in seen:
                seen.add(text)
                print(f"warning: {path}: {text}", file=err)
    # A misspelled setting is ignored: the file would not do what it says.
    return 1 if misspelled else 0


def _rules_for(config: Config, listener: str | None) -> tuple[Rule, ...]:
    wanted = wanted_listeners(config, ())
    if listener is not None:
        from muxtwist.config import endpoint_description

        key = endpoint_description(listener)
        if key not in wanted:
            raise ValueError(f"no listener {shown(key)}; the file has: {', '.join(wanted) or 'none'}")
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
    if result.rule is None and final:
        print(f"then: {_fallback(config.settings, 'on_no_match')}", file=out)
    if result.rule is None and not final and "needs more" in result.reason:
        then = route(rules, data, ConnectionInfo(), final=True)
        if then.name:
            where = f"{then.name} ({then.reason})"
        elif not data:
            where = f"on a timeout, {_fallback(config.settings, 'on_timeout')}; at end of stream, " + _fallback(
                config.settings, "on_no_match"
            )
        else:
            where = _fallback(config.settings, "on_no_match")
        print(f"if the client sends nothing more (timeout or end of stream): {where}", file=out)
    return 0 if result.rule is not None else 2


def _fallback(settings: Settings, name: str) -> str:
    """Where ``on_timeout`` or ``on_no_match`` sends a connection, in words."""
    factory = getattr(settings, name)
    if factory is None:
        return f"the connection will be closed ({name} is not set)"
    return f"{name} -> {_short(_factory_name(factory))}"


def read_bytes(text: str | None, hex_text: str | None, file: str | None, stdin: Any) -> bytes:
    """
    The client's first bytes from ``explain``'s arguments: hex, a file, or
    ``text``: ``-`` for standard input, ``@path`` for a file, otherwise text
    with Python escapes (``GET / HTTP/1.1\\r\\n``).

    :raises ValueError: with a message naming the argument.
    """
    if hex_text is not None:
        try:
            return bytes.fromhex(hex_text.replace(":", " "))
        except ValueError as e:
            raise ValueError(f"--hex: {e}") from None
    if file is None and text is not None and text.startswith("@"):
        file = text[1:]
    if file is not None:
        try:
            with open(file, "rb") as f:
                return f.read()
        except OSError as e:
            raise ValueError(f"{file}: {e.strerror or e}") from None
    if text == "-":
        data: bytes = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("latin-1")
        return data
    assert text is not None
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        raw = text.encode("utf-8")
    try:
        return codecs.escape_decode(raw)[0]
    except ValueError as e:
        raise ValueError(f"bad escape in {shown(text)}: {e}") from None


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None, stdin: Any = None
) -> int:
    """The ``python -m muxtwist`` command line; returns the exit code."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    stdin = stdin if stdin is not None else sys.stdin
    parser = argparse.ArgumentParser(prog="python -m muxtwist", description="Tools for muxtwist rules files.")
    commands = parser.add_subparsers(dest="command", required=True)
    p_check = commands.add_parser("check", help="load and validate a rules file, print its listeners and rules")
    p_check.add_argument("rules", help="the rules file")
    p_check.add_argument("--port", action="append", default=[], help="a --port as twistd would get it (repeatable)")
    p_doctor = commands.add_parser("doctor", help="check what the host needs for the file's transparent rules")
    p_doctor.add_argument("rules", help="the rules file")
    p_explain = commands.add_parser("explain", help="show where a connection sending these bytes would go")
    p_explain.add_argument("rules", help="the rules file")
    p_explain.add_argument(
        "bytes",
        nargs="?",
        help=r"the client's first bytes as text with escapes ('GET / HTTP/1.1\r\nHost: a\r\n\r\n'), "
        "@FILE for a file, or - for standard input",
    )
    source = p_explain.add_mutually_exclusive_group()
    source.add_argument("--hex", help="the client's first bytes, in hex (spaces allowed)")
    source.add_argument("--file", help="a file holding the client's first bytes (a raw capture)")
    p_explain.add_argument("--listener", help="which listener's rules (default: the 'rules' list)")
    p_explain.add_argument(
        "--final", action="store_true", help="the client sent nothing more (end of stream or timeout)"
    )
    args, extra = parser.parse_known_args(argv)
    if args.command == "doctor":
        from muxtwist.doctor import doctor

        return doctor(args.rules, out, err)
    if args.command == "check":
        return check(args.rules, args.port, out, err)
    if extra:
        # argparse gives an optional positional out after an option
        # (``explain rules.py --final 'GET'``): take it here.
        if args.command != "explain" or args.bytes is not None or len(extra) > 1:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.bytes = extra[0]
    if sum(x is not None for x in (args.bytes, args.hex, args.file)) != 1:
        print("muxtwist: explain wants the client's bytes once: BYTES, @FILE, -, --hex or --file", file=err)
        return 1
    try:
        data = read_bytes(args.bytes, args.hex, args.file, stdin)
    except ValueError as e:
        print(f"muxtwist: {e}", file=err)
        return 1
    return explain(args.rules, data, args.listener, args.final, out, err)
