"""
``python -m muxtwist doctor rules.py``: what the host still needs for the
file's transparent rules.

For each ``Proxy(..., transparent=True)`` reachable from the file's rules
it checks, on this host, as this process: the capability
(:data:`~muxtwist.transparent.CAPABILITY`), the policy route that delivers the
backends' replies locally (an ``ip rule`` for the reply mark and the routing
table it names, by number or by a name declared in iproute2's ``rt_tables``
files; the docs use :data:`~muxtwist.transparent.ROUTE_TABLE`), the
packet-marking rules that give those replies their mark (nftables
table ``inet muxtwist``), and ``route_localnet`` where a backend is on
127.0.0.0/8. What is missing is printed as the exact commands to run; the
exit code is 0 only when nothing is.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any, TextIO

import attrs

from muxtwist._descriptions import split_description
from muxtwist._reachable import backend_pools
from muxtwist.transparent import (
    CAPABILITY,
    OUT_MARK,
    REPLY_MARK,
    ROUTE_TABLE,
    capability_not_required,
    unavailable_reason,
)

__all__ = ["RT_TABLES_DIRS", "Finding", "doctor", "marking_commands", "table_names", "transparent_proxies"]

#: Where iproute2 reads routing-table names (``rt_tables``, then
#: ``rt_tables.d/*.conf``, in each); a name declared in a later directory
#: wins, as ``/etc`` overrides the distribution's defaults.
RT_TABLES_DIRS = ("/usr/share/iproute2", "/etc/iproute2")

# The names ip knows without any file.
_BUILTIN_TABLES = {"unspec": 0, "default": 253, "main": 254, "local": 255}


@attrs.frozen
class Finding:
    """One thing checked: what, whether it is in place, and the commands that would put it there."""

    what: str
    ok: bool
    detail: str = ""
    commands: tuple[str, ...] = ()


def transparent_proxies(
    rules: Sequence[Any], on_timeout: object = None, on_no_match: object = None
) -> Iterator[tuple[str, Any]]:
    """``(rule name, proxy)`` for each transparent proxy reachable from ``rules``, nested ones included."""
    top = SimpleNamespace(rules=rules, on_timeout=on_timeout, on_no_match=on_no_match)
    for name, proxy in backend_pools(top):
        if getattr(proxy, "transparent", False):
            yield name, proxy


def marking_commands() -> tuple[str, ...]:
    """The nftables commands that mark the replies of transparent connections."""
    out, reply = f"{OUT_MARK:#x}", f"{REPLY_MARK:#x}"
    return (
        "nft add table inet muxtwist",
        "nft 'add chain inet muxtwist output { type route hook output priority mangle; }'",
        "nft 'add chain inet muxtwist prerouting { type filter hook prerouting priority mangle; }'",
        f"nft add rule inet muxtwist output meta mark {out} ct mark set {reply}",
        f"nft add rule inet muxtwist output ct mark {reply} meta mark != {out} meta mark set {reply}",
        f"nft add rule inet muxtwist prerouting ct mark {reply} meta mark set {reply}",
    )


def _run(argv: Sequence[str]) -> str | None:
    """The output of a command, or None when it is missing or fails."""
    return _run_why(argv)[0]


def _run_why(argv: Sequence[str]) -> tuple[str | None, str]:
    """The output of a command (None when it is missing or fails) and the first line of its errors."""
    if shutil.which(argv[0]) is None:
        return None, f"{argv[0]} is not installed"
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)
    if done.returncode == 0:
        return done.stdout, ""
    return None, (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]


def _mark(value: int) -> str:
    # nft prints marks as 0x%08x; accept any number of leading zeros.
    return rf"0x0*{value:x}\b"


def _iptables_marking(versions: Sequence[int]) -> bool:
    """Whether ``iptables``/``ip6tables`` hold the docs' marking rules for every IP version in ``versions``."""
    out, reply = _mark(OUT_MARK), _mark(REPLY_MARK)
    set_reply = rf"--set-x?mark {reply}(/0xffffffff)?$"
    wanted = (
        rf"^-A OUTPUT -m mark --mark {out} -j CONNMARK {set_reply}",
        rf"^-A OUTPUT -m connmark --mark {reply} -m mark ! --mark {out} -j MARK {set_reply}",
        rf"^-A PREROUTING -m connmark --mark {reply} -j MARK {set_reply}",
    )
    for version in versions:
        listed = _run(["iptables" if version == 4 else "ip6tables", "-t", "mangle", "-S"])
        if listed is None or not all(re.search(rule, listed, re.M) for rule in wanted):
            return False
    return True


def _check_marking(versions: Sequence[int] = (4,)) -> Finding:
    ruleset, error = _run_why(["nft", "list", "table", "inet", "muxtwist"])
    what = "packet marking (nftables table inet muxtwist)"
    if ruleset is None and "No such file or directory" not in error and shutil.which("nft") is not None:
        # Not "absent": nft could not tell (no CAP_NET_ADMIN, say). Adding
        # the rules to a table that has them would only double them.
        return Finding(what, False, f"nft could not list it: {error}")
    if ruleset is None and _iptables_marking(versions):
        # The iptables form of the same rules (docs/howto/transparent.rst) does the same.
        return Finding("packet marking (iptables mangle table)", True)
    if ruleset is None:
        why = "nft is not installed" if shutil.which("nft") is None else "the table inet muxtwist does not exist"
        return Finding(what, False, why, marking_commands())
    commands = marking_commands()
    wanted = [  # (chain, the rule as its command adds it, how nft lists it)
        ("output", commands[3], rf"meta mark {_mark(OUT_MARK)} ct mark set {_mark(REPLY_MARK)}"),
        ("output", commands[4], rf"ct mark {_mark(REPLY_MARK)} meta mark != {_mark(OUT_MARK)} meta mark set"),
        ("prerouting", commands[5], rf"ct mark {_mark(REPLY_MARK)} meta mark set {_mark(REPLY_MARK)}"),
    ]
    chains = dict(re.findall(r"chain (\w+) \{(.*?)\n\s*\}", ruleset, re.S))
    missing = [
        f"chain {chain}: {command.split(chain, 1)[1].strip()}"
        for chain, command, listed in wanted
        if chain not in chains or re.search(listed, chains[chain]) is None
    ]
    hooks = {"output": "type route hook output", "prerouting": "type filter hook prerouting"}
    missing += [f"chain {c} must be '{h}'" for c, h in hooks.items() if c in chains and h not in chains[c]]
    if missing:
        return Finding(
            what,
            False,
            "missing: " + "; ".join(missing),
            ("nft delete table inet muxtwist", *marking_commands()),
        )
    return Finding(what, True)


def table_names(directories: Sequence[str] = RT_TABLES_DIRS) -> dict[str, int]:
    """
    The routing-table names iproute2 knows, with their numbers: its built-in
    ones and those declared (``100 muxtwist``, or ``0x64 muxtwist``) in
    ``rt_tables`` and ``rt_tables.d/*.conf`` under each of ``directories``
    that exists.
    """
    names = dict(_BUILTIN_TABLES)
    for directory in directories:
        dropins = sorted(glob.glob(os.path.join(glob.escape(directory), "rt_tables.d", "*.conf")))
        for path in [os.path.join(directory, "rt_tables"), *dropins]:
            try:
                with open(path, errors="replace") as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if len(fields) < 2 or fields[0].startswith("#"):
                    continue
                try:
                    number = int(fields[0], 16) if fields[0].lower().startswith("0x") else int(fields[0])
                except ValueError:
                    continue
                names[fields[1]] = number
    return names


def reply_tables(rules: str) -> list[str]:
    """
    The tables, as ``ip rule show`` prints them (a number, or a name
    declared for it), that the rules send every packet marked
    :data:`~muxtwist.transparent.REPLY_MARK` to, in the order the kernel tries them.
    """
    # Every packet with the mark, whatever its source: "not from all fwmark ..."
    # or "from 10.0.0.0/8 fwmark ..." would leave replies out.
    return re.findall(rf"^\d+:\s+from all fwmark {_mark(REPLY_MARK)}(?:/0x0*f+)? lookup (\S+)", rules, re.M)


def _table_label(table: str, number: int | None) -> str:
    return f"{table} ({number})" if number is not None and table != str(number) else table


def _local_route(routes: str) -> bool:
    return re.search(r"^local (default|0\.0\.0\.0/0|::/0) dev lo\b", routes, re.M) is not None


def _check_route(version: int, rt_tables_dirs: Sequence[str] = RT_TABLES_DIRS) -> list[Finding]:
    ip = ["ip", f"-{version}"]
    default = "0.0.0.0/0" if version == 4 else "::/0"
    rules = _run([*ip, "rule", "show"])
    if rules is None:
        return [Finding(f"IPv{version} policy routing", False, "the ip command (iproute2) is missing or failed")]
    names = table_names(rt_tables_dirs)
    tables = reply_tables(rules)
    # With no rule, the docs' table; with several, the kernel goes on to the
    # next rule's table only when one holds no route at all.
    looked_up: list[tuple[str, int | None, str]] = []
    for table in tables or [str(ROUTE_TABLE)]:
        number = int(table) if table.isdigit() else names.get(table)
        # A name doctor found no number for is still one ip knows: it printed it.
        held = _run([*ip, "route", "show", "table", table if number is None else str(number)]) or ""
        looked_up.append((table, number, held))
        if held.strip():
            break
    chosen, number, routes = looked_up[-1] if looked_up[-1][2].strip() else looked_up[0]
    label = _table_label(chosen, number)
    target = chosen if number is None else str(number)
    findings = [
        Finding(
            f"IPv{version} rule: packets marked {REPLY_MARK:#x} use table {label}",
            bool(tables),
            "" if tables else "no such ip rule",
            () if tables else (f"{' '.join(ip)} rule add fwmark {REPLY_MARK:#x} lookup {ROUTE_TABLE}",),
        )
    ]
    has_route = _local_route(routes)
    findings.append(
        Finding(
            f"IPv{version} table {label}: deliver everything locally",
            has_route,
            "" if has_route else f"table {label} has no 'local default dev lo' route" + _holds(routes),
            # "replace", not "add": "add" fails if the table has another default route.
            () if has_route else (f"{' '.join(ip)} route replace local {default} dev lo table {target}",),
        )
    )
    return findings


def _holds(table: str) -> str:
    routes = [line.strip() for line in table.splitlines() if line.strip()]
    return f" (it has: {'; '.join(routes)})" if routes else ""


def _backend_hosts(proxy: Any) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The IP addresses of ``proxy``'s backends (their ``host=``, read as Twisted reads a description)."""
    hosts = []
    for backend in proxy.backends:
        try:
            hosts.append(ipaddress.ip_address(split_description(backend.description)[1].get("host", "")))
        except ValueError:
            continue
    return hosts


def _check_localnet() -> Finding:
    try:
        with open("/proc/sys/net/ipv4/conf/all/route_localnet") as f:
            on = f.read().strip() == "1"
    except OSError:
        on = False
    return Finding(
        "route_localnet (a backend is on 127.0.0.0/8)",
        on,
        "" if on else "replies from 127.0.0.0/8 to a client address are dropped as martians",
        ()
        if on
        else (
            "sysctl -w net.ipv4.conf.all.route_localnet=1",
            "nft add table inet muxtwist_localnet",
            "nft 'add chain inet muxtwist_localnet martians { type filter hook prerouting priority raw; }'",
            "nft add rule inet muxtwist_localnet martians iif != lo ip daddr 127.0.0.0/8 drop",
        ),
    )


def _check_capability() -> Finding:
    """Whether this process may set what a transparent backend socket needs (tried for real)."""
    reason = unavailable_reason()
    return Finding(f"capability {CAPABILITY} (IP_TRANSPARENT, SO_MARK)", reason is None, reason or "")


def findings_for(proxies: Sequence[Any], rt_tables_dirs: Sequence[str] = RT_TABLES_DIRS) -> list[Finding]:
    """Everything the host needs for these transparent proxies, checked (table names read under ``rt_tables_dirs``)."""
    found = [_check_capability()]
    hosts = [h for p in proxies for h in _backend_hosts(p)]
    versions = sorted({h.version for h in hosts}) or [4]
    found.append(_check_marking(versions))
    for version in versions:
        found += _check_route(version, rt_tables_dirs)
    if any(h.version == 4 and h.is_loopback for h in hosts):
        found.append(_check_localnet())
    if any(h.version == 6 and h.is_loopback for h in hosts):
        found.append(
            Finding(
                "IPv6 backend on ::1",
                False,
                "Linux never routes ::1 to or from another address; give the backend another local address",
            )
        )
    return found


def doctor(path: str, out: TextIO, err: TextIO) -> int:
    """Check what the transparent rules of ``path`` need; 0 when everything is in place."""
    from muxtwist.config import ConfigError, load_config
    from muxtwist.service import wanted_listeners

    try:
        # Without the capability the rules do not load; doctor says so among its findings.
        with capability_not_required():
            config = load_config(path)
    except ConfigError as e:
        print(f"muxtwist: {e}", file=err)
        return 1
    pairs = [
        pair
        for rules in wanted_listeners(config, ()).values()
        for pair in transparent_proxies(rules, config.settings.on_timeout, config.settings.on_no_match)
    ]
    if not pairs:
        print(f"{path}: no rule proxies transparently; nothing to check", file=out)
        return 0
    names = sorted({name for name, _ in pairs})
    print(f"{path}: transparent rules: {', '.join(names)}", file=out)
    findings = findings_for([p for _, p in pairs])
    commands: list[str] = []
    for f in findings:
        print(f"  [{'ok' if f.ok else 'MISSING'}] {f.what}{'' if f.ok else ': ' + f.detail}", file=out)
        commands += [c for c in f.commands if c not in commands]
    if all(f.ok for f in findings):
        print("everything transparent proxying needs is in place", file=out)
        return 0
    if commands:
        print("to fix, run as root:", file=out)
        for c in commands:
            print(f"  {c}", file=out)
    return 1
