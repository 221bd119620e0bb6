"""
The ``rules.py`` loader: run the file, read the names it defines, and check
every one of them, so that a mistake is one clear message naming the file,
the line and the problem.
"""

from __future__ import annotations

import ast
import codecs
import contextlib
import difflib
import io
import os
import re
import stat
import sys
import tokenize
import traceback
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.interfaces import IProtocolFactory, IReactorCore
from twisted.logger import Logger

from muxtwist._options import shown
from muxtwist._signals import keep_our_handlers
from muxtwist._source_coding import not_for_source, wide_encoding, wide_without_mark
from muxtwist._twisted import endpoint_port
from muxtwist.interfaces import IMatcher
from muxtwist.sniffing import Rule, SniffingFactory, duplicate_names
from muxtwist.udp.listener import is_udp, parse_udp_description, udp_target_problem
from muxtwist.udp.mux import is_datagram_target

__all__ = [
    "Config",
    "ConfigError",
    "ConfigWarning",
    "Settings",
    "build_factory",
    "endpoint_description",
    "load_config",
]

log = Logger()

SETTINGS = (
    "sniff_timeout",
    "max_sniff_bytes",
    "on_timeout",
    "on_no_match",
    "max_connections",
    "max_connections_per_source",
    "shutdown_timeout",
    "accept_proxy_protocol",
    "log_connections",
    "max_udp_flows",
    "max_flows_per_source",
    "max_sniff_datagrams",
)


class ConfigError(Exception):
    """A rules file that cannot be used: where, and what is wrong."""

    def __init__(self, path: str, line: int | None, problem: str) -> None:
        super().__init__(path, line, problem)
        self.path = path
        self.line = line
        self.problem = problem

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.problem}"


@attrs.frozen
class Settings:
    """The listener settings a rules file may set (or their defaults)."""

    sniff_timeout: float = 5.0
    max_sniff_bytes: int = 16384
    on_timeout: IProtocolFactory | None = None
    on_no_match: IProtocolFactory | None = None
    max_connections: int | None = None
    max_connections_per_source: int | None = None
    log_connections: bool = True
    shutdown_timeout: float = 30.0
    accept_proxy_protocol: tuple[str, ...] | None = None
    #: UDP listeners (muxtwist.udp): flow table size, live flows per source host, datagrams held while sniffing.
    max_udp_flows: int | None = None
    max_flows_per_source: int | None = None
    max_sniff_datagrams: int | None = None


@attrs.frozen
class Config:
    """
    A loaded rules file: ``rules`` for the ``--port`` listeners (``None`` if
    the file only has ``listeners``), per-port ``listeners`` and settings.
    """

    path: str
    rules: tuple[Rule, ...] | None
    listeners: Mapping[str, tuple[Rule, ...]]
    settings: Settings
    warnings: tuple[ConfigWarning, ...] = ()


@attrs.frozen
class ConfigWarning:
    """
    Something in a usable rules file that is probably not what its author
    meant: a ``misspelled`` setting name (ignored, so ``check`` fails on it),
    a rule offering ``h2`` to a factory that cannot speak it (``h2``), or a
    listener with no rules and no ``on_no_match`` (``empty``).
    """

    path: str
    line: int | None
    problem: str
    kind: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.problem}"


#: The module-level names the loader reads; anything else is the file's own.
KNOWN_NAMES = ("rules", "listeners", *SETTINGS)


def _misspelled(path: str, ns: Mapping[str, Any], lines: Mapping[str, tuple[int, list[int]]]) -> list[ConfigWarning]:
    """A warning for each name the file assigns that is not read but looks like one that is."""
    found = []
    for name, (line, _) in lines.items():
        if name in KNOWN_NAMES or name.startswith("_") or name not in ns:
            continue
        close = difflib.get_close_matches(name, KNOWN_NAMES, n=1, cutoff=0.85)
        if close:
            found.append(
                ConfigWarning(
                    path, line, f"{name!r} is not a setting and is ignored; did you mean {close[0]!r}?", "misspelled"
                )
            )
    return found


def _h2_without_support(path: str, rules: Sequence[Rule], line: int | None) -> list[ConfigWarning]:
    """A warning for each TerminateTLS that offers h2 while a twisted.web Site behind it cannot speak HTTP/2."""
    from muxtwist._checks import h2_unable_sites

    return [
        ConfigWarning(
            path,
            line,
            f"{shown(tls)} offers h2 (ALPN), but {shown(site)} behind it cannot speak HTTP/2: "
            "Twisted's HTTP/2 support is "
            'not installed (pip install "Twisted[http2]"), so clients that pick h2 will fail',
            "h2",
        )
        for tls, site in h2_unable_sites(rules)
    ]


#: muxtwist's matchers of stream (TCP) protocols: on a UDP listener they see one
#: datagram at a time and are most likely a mistake (TLS over UDP is QUIC or DTLS).
STREAM_MATCHERS = frozenset(
    {
        "ALPN", "ClientHello", "GRPC", "HTTP1", "HTTP2", "HTTP2Header", "MQTT", "PostgreSQL", "ProxyProtocol",
        "RDP", "Redis", "SNI", "SOCKS4", "SOCKS5", "SSH", "TLS", "WebSocket", "XMPP",
    }
)  # fmt: skip


def _stream_matchers(matcher: object) -> list[str]:
    """The names of muxtwist's stream-protocol matchers in ``matcher``, combinators looked through at any depth."""
    found: list[str] = []
    seen: set[int] = set()
    left = [matcher]
    while left:
        m = left.pop()
        kind = type(m)
        if id(m) in seen or not kind.__module__.startswith("muxtwist.matchers"):
            continue
        seen.add(id(m))
        if kind.__name__ in STREAM_MATCHERS:
            found.append(kind.__name__)
        inner = [*getattr(m, "matchers", ()), getattr(m, "matcher", None)]
        left += [each for each in reversed(inner) if each is not None]
    return found


def _stream_matchers_on_udp(
    path: str, description: str, rules: Sequence[Rule], line: int | None
) -> list[ConfigWarning]:
    """A warning for each rule of the UDP listener ``description`` that uses a stream-protocol matcher."""
    if not is_udp(description):
        return []
    return [
        ConfigWarning(
            path,
            line,
            f"rule {shown(rule.name)} of {shown(description)} uses {', '.join(f'{n}()' for n in names)}, "
            "a matcher of a "
            "stream (TCP) protocol: on a UDP listener it sees one datagram at a time and will likely never match "
            "(TLS over UDP is QUIC() or DTLS())",
            "udp",
        )
        for rule in rules
        if (names := _stream_matchers(rule.matcher))
    ]


def endpoint_description(port: str) -> str:
    """``"3000"`` -> ``"tcp:3000"``; anything else is taken as an endpoint description."""
    return f"tcp:{port}" if port.isdigit() else port


def check_endpoint(description: str) -> None:
    """Raise ValueError if ``description`` is not a server endpoint description we can use."""
    if is_udp(description):
        parse_udp_description(description)
        return
    from twisted.internet import endpoints

    class _NoReactor:
        pass

    try:
        endpoint = endpoints.serverFromString(_NoReactor(), description)
    except Exception as e:
        raise ValueError(f"bad endpoint description {shown(description)}: {_clip(str(e))}") from None
    port, _ = endpoint_port(endpoint) or (0, "")
    if not 0 <= port <= 65535:
        raise ValueError(f"bad endpoint description {shown(description)}: port {port} is not in 0-65535")


def _assignment_lines(source: str) -> dict[str, tuple[int, list[int]]]:
    """For each module-level name: the line it is assigned on, and the lines of its list's items."""
    lines: dict[str, tuple[int, list[int]]] = {}
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return lines
    for node in tree.body:
        targets: list[ast.expr] = []
        value: ast.expr | None = None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign):
            targets, value = [node.target], node.value
        for t in targets:
            if isinstance(t, ast.Name):
                items: list[int] = []
                if isinstance(value, ast.List | ast.Tuple):
                    items = [e.lineno for e in value.elts]
                elif isinstance(value, ast.Dict):
                    items = [v.lineno for v in value.values]
                lines[t.id] = (node.lineno, items)
    return lines


#: A coding declaration (PEP 263), as tokenize reads it.
#: The most a rules file is read of: past it, one error instead of reading
#: on (``--config /dev/zero`` would fill the memory, and a reload would hold
#: the reactor meanwhile). Rules files are a few kilobytes.
MAX_RULES_FILE_BYTES = 16 * 2**20

_DECLARATION = re.compile(rb"^[ \t\f]*#.*?coding[:=][ \t]*([-\w.]+)")


def _declaration(raw: bytes) -> tuple[int, str] | None:
    """The line (1 or 2) of the file's coding declaration and the encoding it names, if it has one."""
    for number, line in enumerate(raw.removeprefix(codecs.BOM_UTF8).splitlines()[:2], 1):
        if found := _DECLARATION.match(line):
            return number, found.group(1).decode("ascii", "replace")
    return None


def _unusable_coding(path: str, raw: bytes, name: str, why: str) -> ConfigError:
    """The error of a file whose coding declaration names ``name``, which cannot be used (``why``)."""
    declared = _declaration(raw)
    # The name is the file's own text, of any length: shown cut, as any value.
    return ConfigError(
        path,
        declared and declared[0],
        f"coding {shown(declared[1] if declared else name)} cannot be used for a Python source file: {why}",
    )


def _run(path: str) -> tuple[dict[str, Any], str]:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0  # open() below says what is wrong
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):
        # Opening a named pipe waits for a writer, and a device may never
        # end: at a reload either would hold the reactor. Rules are re-read
        # at every reload, so they are a file.
        raise ConfigError(path, None, "not a regular file (a pipe, a device or a socket): rules are read from a file")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RULES_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(path, None, f"cannot read the rules file: {e.strerror or e}") from None
    if len(raw) > MAX_RULES_FILE_BYTES:
        raise ConfigError(
            path, None, f"the file is larger than {MAX_RULES_FILE_BYTES // 2**20} MiB: not read (is it a rules file?)"
        )
    wide = wide_encoding(raw)
    if wide is not None:
        raise ConfigError(
            path,
            1,
            f"the file is {wide} text (it starts with a {wide} byte order mark): Python source must be in an"
            " ASCII-compatible encoding (save the file as UTF-8)",
        )
    nul = raw.find(b"\0")
    if nul >= 0:
        # Python's own error for it names no line and no cause.
        looks_like = wide_without_mark(raw)
        if looks_like is not None:
            raise ConfigError(
                path,
                1,
                f"the file contains NUL bytes: it is probably {looks_like} text without a byte order mark; Python"
                " source must be in an ASCII-compatible encoding (save the file as UTF-8)",
            )
        line = raw.count(b"\n", 0, nul) + 1
        raise ConfigError(path, line, "the file contains a NUL byte, which Python source cannot contain")
    try:
        # UTF-8 unless a coding declaration says otherwise, as for any Python file.
        encoding = tokenize.detect_encoding(io.BytesIO(raw).readline)[0]
    except SyntaxError as e:
        if not e.msg.startswith("invalid or missing encoding declaration"):
            # An unknown encoding, or one that contradicts a byte order mark:
            # tokenize gives no line, but the declaration is on line 1 or 2.
            declared = _declaration(raw)
            if declared is not None and e.msg.startswith("unknown encoding"):
                raise _unusable_coding(path, raw, declared[1], "Python knows no encoding of that name") from None
            problem = f"syntax error: {_clip(e.msg, 200)}"
            if declared is not None and e.msg.startswith("encoding problem"):
                problem = (
                    f"syntax error: the file starts with a UTF-8 byte order mark but declares {shown(declared[1])}"
                )
            raise ConfigError(path, declared and declared[0], problem) from None
        # A line of the first two that is not UTF-8: said below, with its byte and line.
        encoding = "utf-8"
    why = not_for_source(encoding)
    if why is not None:
        # UTF-16, UTF-32, EBCDIC, or a bytes-to-bytes codec: decoding the file
        # with it gives nonsense, a LookupError or a confusing syntax error.
        raise _unusable_coding(path, raw, encoding, why)
    try:
        source = raw.decode(encoding)
    except UnicodeDecodeError as e:
        # The codec may have decoded less than the file (utf-8-sig: all but the byte order mark).
        at = e.start + len(raw) - len(e.object)
        bad_line = raw.count(b"\n", 0, at) + 1
        what = "UTF-8" if encoding in ("utf-8", "utf-8-sig") else encoding
        raise ConfigError(
            path, bad_line, f"the file is not {what} text: byte {raw[at : at + 1].hex()} cannot be decoded"
        ) from None
    try:
        code = compile(source, path, "exec")
    except SyntaxError as e:
        raise ConfigError(path, e.lineno, f"syntax error: {_clip(e.msg, 200)}") from None
    module = types.ModuleType("muxtwist_rules")
    module.__file__ = path
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)
    try:
        exec(code, module.__dict__)
    except BaseException as e:
        # sys.exit() (or any BaseException) in the file is a broken file too:
        # at a reload it must not end the server, nor vanish without a word.
        said = _message(e)
        raise ConfigError(
            path, _file_line(path, e), f"{type(e).__name__} while loading{': ' + said if said else ''}"
        ) from None
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass
    return module.__dict__, source


def _file_line(path: str, error: BaseException) -> int | None:
    """The last line of the file ``path`` that ``error``'s traceback went through, if any."""
    line = None
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        if frame.f_code.co_filename == path:
            line = lineno
    return line


def _message(error: BaseException) -> str:
    """What ``error`` says (at most a few lines' worth), or nothing when it says nothing or its ``__str__`` fails."""
    try:
        said = "" if error.args == (None,) else str(error)
    except Exception:
        said = ""  # its __str__ is broken too: the type and the line must do
    return _clip(said)


def _clip(text: str, limit: int = 400) -> str:
    """``text`` cut to ``limit`` characters: a message of another module's making, holding a value of the file's."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _checking(path: str, name: str, line: int | None) -> Iterator[None]:
    """
    While ``name`` is checked, anything raised but a ConfigError becomes
    one: a value that breaks the checks (a list whose ``__iter__`` raises, a
    ``__len__`` or ``__eq__`` that does) is a broken file too, and at a
    reload it must leave the running rules as any other broken file does.
    """
    try:
        yield
    except ConfigError:
        raise
    except BaseException as e:  # sys.exit() in a __len__ too, as in _run
        raised = _file_line(path, e)
        at = f" at line {raised}" if raised is not None and raised != line else ""
        said = _message(e)
        raise ConfigError(
            path, line, f"{name} could not be checked: {type(e).__name__}{at}{': ' + said if said else ''}"
        ) from None


def _check_rules(path: str, name: str, value: object, lines: tuple[int, list[int]] | None) -> tuple[Rule, ...]:
    line = lines[0] if lines else None
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise ConfigError(path, line, f"{name} must be a list of Rule, got {type(value).__name__}")
    # Read once, into a plain tuple: what is checked is what is served.
    items = tuple(value)
    for i, rule in enumerate(items):
        item_line = lines[1][i] if lines and i < len(lines[1]) else line
        if not isinstance(rule, Rule):
            raise ConfigError(path, item_line, f"{name}[{i}] is not a Rule: {shown(rule)}")
        if not IMatcher.providedBy(rule.matcher):
            raise ConfigError(path, item_line, f"{name}[{i}]: matcher {shown(rule.matcher)} is not an IMatcher")
        if not IProtocolFactory.providedBy(rule.factory) and not is_datagram_target(rule.factory):
            raise ConfigError(path, item_line, f"{name}[{i}]: factory {shown(rule.factory)} is not an IProtocolFactory")
    clash = duplicate_names(items)
    if clash is not None:
        first, second, rule_name = clash
        if second < 0:
            first_line = lines[1][first] if lines and first < len(lines[1]) else line
            raise ConfigError(path, first_line, f"{name}[{first}] takes the reserved rule name {shown(rule_name)}")
        second_line = lines[1][second] if lines and second < len(lines[1]) else line
        first_line = lines[1][first] if lines and first < len(lines[1]) else line
        raise ConfigError(
            path,
            second_line,
            f"{name}[{second}] is named {shown(rule_name)} like {name}[{first}]"
            f"{f' (line {first_line})' if first_line is not None else ''}; rule names must be unique: give one a name=",
        )
    return items


def _plain_number(value: int | float) -> int | float:
    """``value`` as a plain int or float: a subclass's own comparisons (or their exceptions) go no further."""
    return float.__float__(value) if isinstance(value, float) else int.__int__(value)


def _number(path: str, line: int | None, name: str, value: object, *, integer: bool, optional: bool) -> Any:
    if value is None and optional:
        return None
    want = "a positive integer" if integer else "a non-negative finite number"
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ConfigError(path, line, f"{name} must be {want}{' or None' if optional else ''}, got {shown(value)}")
    number = _plain_number(value)  # type: ignore[arg-type]
    if (not integer and not number <= sys.float_info.max) or number < 0 or (integer and number == 0):
        raise ConfigError(path, line, f"{name} must be {want}{' or None' if optional else ''}, got {shown(number)}")
    return number


def _check_setting(path: str, line: int | None, name: str, value: object) -> Any:
    """``value`` checked as the setting ``name``: what :class:`Settings` is given."""
    if name == "sniff_timeout":
        number = _plain_number(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        # (NaN fails the comparison too; an int beyond a float overflows callLater.)
        if number is None or not 0 < number <= sys.float_info.max:
            shown_value = shown(value if number is None else number)
            raise ConfigError(path, line, f"sniff_timeout must be a finite number more than 0, got {shown_value}")
        return number
    if name == "shutdown_timeout":
        return _number(path, line, name, value, integer=False, optional=False)
    if name == "max_sniff_bytes":
        return _number(path, line, name, value, integer=True, optional=False)
    if name in ("max_connections", "max_connections_per_source", "max_udp_flows", "max_flows_per_source",
                "max_sniff_datagrams"):  # fmt: skip
        return _number(path, line, name, value, integer=True, optional=True)
    if name == "log_connections":
        if not isinstance(value, bool):
            raise ConfigError(path, line, f"log_connections must be True or False, got {shown(value)}")
        return value
    if name in ("on_timeout", "on_no_match"):
        if value is not None and not IProtocolFactory.providedBy(value):
            raise ConfigError(path, line, f"{name} must be an IProtocolFactory or None, got {shown(value)}")
        return value
    assert name == "accept_proxy_protocol", name
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(path, line, f"accept_proxy_protocol must be a list of CIDRs, got {shown(value)}")
    entries = tuple(value)
    for i, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise ConfigError(path, line, f"accept_proxy_protocol[{i}] must be a CIDR or 'unix', got {shown(entry)}")
    entries = tuple(str.__str__(entry) for entry in entries)
    from muxtwist.proxyprotocol import Trust

    try:
        Trust.parse(entries)
    except ValueError as e:
        raise ConfigError(path, line, f"accept_proxy_protocol: {_clip(str(e))}") from None
    return entries


def _check_settings(path: str, ns: Mapping[str, Any], lines: Mapping[str, tuple[int, list[int]]]) -> Settings:
    values: dict[str, Any] = {}
    for name in SETTINGS:
        if name in ns:
            line = lines[name][0] if name in lines else None
            with _checking(path, name, line):
                values[name] = _check_setting(path, line, name, ns[name])
    return Settings(**values)


def _check_listeners(path: str, raw: object, where: tuple[int, list[int]] | None) -> dict[str, tuple[Rule, ...]]:
    line = where[0] if where else None
    if not isinstance(raw, Mapping):
        raise ConfigError(path, line, f"listeners must be a dict of endpoint -> rules, got {type(raw).__name__}")
    listeners: dict[str, tuple[Rule, ...]] = {}
    for i, (key, listener_rules) in enumerate(tuple(raw.items())):
        item_line = where[1][i] if where and i < len(where[1]) else line
        if not isinstance(key, str):
            raise ConfigError(path, item_line, f"listeners key {shown(key)} is not an endpoint description")
        description = endpoint_description(str.__str__(key))
        try:
            check_endpoint(description)
        except ValueError as e:
            raise ConfigError(path, item_line, f"listeners: {_clip(str(e))}") from None
        listeners[description] = _check_rules(
            path, f"listeners[{shown(description)}]", listener_rules, (item_line, []) if item_line else None
        )
        if (problem := udp_target_problem(description, listeners[description])) is not None:
            raise ConfigError(path, item_line, _clip(problem))
    return listeners


def _warnings(
    path: str, ns: Mapping[str, Any], lines: Mapping[str, tuple[int, list[int]]], config: Config
) -> list[ConfigWarning]:
    """What in a usable file is probably not what its author meant."""
    warnings = _misspelled(path, ns, lines)
    settings = config.settings
    for key, some_rules in ({"rules": config.rules or ()} | dict(config.listeners)).items():
        where = lines.get(key if key == "rules" else "listeners")
        line = where[0] if where else None
        with _checking(path, "rules" if key == "rules" else f"listeners[{shown(key)}]", line):
            warnings += _h2_without_support(path, some_rules, line)
            warnings += _stream_matchers_on_udp(path, key, some_rules, line)
        catch_all = settings.on_no_match is not None or settings.on_timeout is not None
        if not some_rules and (key != "rules" or config.rules is not None) and not catch_all:
            what = "rules is empty" if key == "rules" else f"listener {key} has no rules"
            problem = f"{what} and there is no on_no_match or on_timeout: every connection is closed"
            warnings.append(ConfigWarning(path, line, problem, "empty"))
    return warnings


def load_config(path: str) -> Config:
    """
    Load and check a rules file.

    :raises ConfigError: for any problem, with the file and, where there is
        one, the line.
    """
    with keep_our_handlers(path):
        ns, source = _run(path)
    lines = _assignment_lines(source)
    if "rules" not in ns and "listeners" not in ns:
        raise ConfigError(path, None, "defines neither 'rules' nor 'listeners'")
    rules = None
    if "rules" in ns:
        where = lines.get("rules")
        with _checking(path, "rules", where and where[0]):
            rules = _check_rules(path, "rules", ns["rules"], where)
    listeners: dict[str, tuple[Rule, ...]] = {}
    if "listeners" in ns:
        where = lines.get("listeners")
        with _checking(path, "listeners", where and where[0]):
            listeners = _check_listeners(path, ns["listeners"], where)
    config = Config(path=path, rules=rules, listeners=listeners, settings=_check_settings(path, ns, lines))
    warnings = _warnings(path, ns, lines, config)
    for warning in warnings:
        # Not a field named "warning": trial's reporter reads that as warnings.warn's.
        log.warn("{problem}", problem=str(warning))
    return attrs.evolve(config, warnings=tuple(warnings))


def build_factory(rules: Sequence[Rule], settings: Settings, reactor: IReactorCore | None = None) -> SniffingFactory:
    """A :class:`SniffingFactory` for ``rules`` with ``settings``."""
    return SniffingFactory(
        rules,
        sniff_timeout=settings.sniff_timeout,
        max_sniff_bytes=settings.max_sniff_bytes,
        on_timeout=settings.on_timeout,
        on_no_match=settings.on_no_match,
        max_connections=settings.max_connections,
        max_connections_per_source=settings.max_connections_per_source,
        accept_proxy_protocol=settings.accept_proxy_protocol,
        log_connections=settings.log_connections,
        reactor=reactor,  # type: ignore[arg-type]
    )


def apply_settings(factory: SniffingFactory, rules: Sequence[Rule], settings: Settings) -> None:
    """Give a running factory new rules and settings (a reload)."""

    factory.sniff_timeout = settings.sniff_timeout
    factory.max_sniff_bytes = settings.max_sniff_bytes
    factory.max_connections = settings.max_connections
    factory.max_connections_per_source = settings.max_connections_per_source
    factory.log_connections = settings.log_connections
    factory.accept_proxy_protocol = settings.accept_proxy_protocol  # also what it trusts
    factory.set_rules(rules, on_timeout=settings.on_timeout, on_no_match=settings.on_no_match)
