"""
``muxtwist.doctor`` reads backends' descriptions the way Twisted does, imports
no metrics code, finds the policy route's table by number or by a name from
iproute2's ``rt_tables`` files, and names the capability transparent sockets
need as the kernel measures it.

The routing tests run ``ip`` in a network and mount namespace of their own
(``unshare``), which ends with its process: the host's routing and its
``/etc`` are never touched.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from twisted.trial import unittest

import muxtwist.transparent
from muxtwist.doctor import _backend_hosts, _check_capability, reply_tables, table_names
from tests.processes import stop_group
from tests.test_imports import loaded_after
from tests.twistd import ROOT

WAIT = 30.0


def proxy(*descriptions: str) -> SimpleNamespace:
    return SimpleNamespace(backends=[SimpleNamespace(description=d) for d in descriptions])


class BackendHostTests(unittest.SynchronousTestCase):
    def test_hosts_read_as_twisted_reads_them(self) -> None:
        """A backend's host is its host= parameter as Twisted splits the description (escapes, last one given)."""
        hosts = _backend_hosts(
            proxy(
                "tcp:host=127.0.0.1:port=22",
                "tcp:host=\\:\\:1:port=80",
                "tcp:port=80:bindAddress=10.9.9.9\\:host=10.9.9.8:host=10.0.0.7",
                "tcp:host=10.0.0.1:port=81:host=10.0.0.2",
                "tcp:host=backend.example:port=80",
                "unix:path=/run/host=10.0.0.9",
            )
        )
        expected = ["127.0.0.1", "::1", "10.0.0.7", "10.0.0.2"]
        self.assertEqual(hosts, [ipaddress.ip_address(h) for h in expected])

    def test_doctor_imports_no_metrics(self) -> None:
        """Importing muxtwist.doctor and finding transparent proxies loads no prometheus_client."""
        code = "from muxtwist.doctor import transparent_proxies\nlist(transparent_proxies([]))"
        self.assertEqual(loaded_after(code), [])


class TableNameTests(unittest.SynchronousTestCase):
    def directory(self, files: dict[str, str]) -> str:
        """A scratch iproute2 configuration directory holding ``files`` (paths relative to it)."""
        top: str = self.mktemp()
        for name, text in files.items():
            os.makedirs(os.path.dirname(os.path.join(top, name)), exist_ok=True)
            with open(os.path.join(top, name), "w") as f:
                f.write(textwrap.dedent(text))
        return top

    def test_names_are_read_from_rt_tables_and_its_conf_dropins(self) -> None:
        """Names come from rt_tables and rt_tables.d/*.conf (decimal or hex, comments skipped), besides ip's own."""
        top = self.directory(
            {
                "rt_tables": "# reserved values\n255\tlocal\n#1\tinr.ruhep\n  200 other # a comment\n",
                "rt_tables.d/muxtwist.conf": "0x64 muxtwist\nnot-a-number ignored\n",
                "rt_tables.d/old.conf.bak": "300 ignored\n",
            }
        )
        names = table_names([top])
        self.assertEqual((names["muxtwist"], names["other"], names["main"], names["local"]), (100, 200, 254, 255))
        self.assertNotIn("ignored", names)
        self.assertNotIn("inr.ruhep", names)

    def test_etc_overrides_the_distribution_defaults(self) -> None:
        """A name declared in a later directory (/etc after /usr/share) takes that directory's number."""
        usr = self.directory({"rt_tables": "100 muxtwist\n", "rt_tables.d/x.conf": "150 vendor\n"})
        etc = self.directory({"rt_tables.d/muxtwist.conf": "120 muxtwist\n"})
        names = table_names([usr, etc, self.mktemp()])
        self.assertEqual((names["muxtwist"], names["vendor"]), (120, 150))

    def test_reply_tables_are_those_of_unconditional_rules_for_the_mark_in_order(self) -> None:
        """Rules for every packet with mark 0x1 count, named or numbered, in order; negated or sourced ones do not."""
        listed = (
            "0:\tfrom all lookup local\n"
            "32761:\tnot from all fwmark 0x1 lookup 7\n"
            "32762:\tfrom 10.0.0.0/8 fwmark 0x1 lookup 8\n"
            "32763:\tfrom all fwmark 0x10 lookup 9\n"
            "32764:\tfrom all fwmark 0x1/0xff lookup other\n"
            "32765:\tfrom all fwmark 0x1 lookup muxtwist\n"
            "32766:\tfrom all lookup main\n"
        )
        self.assertEqual(reply_tables(listed), ["other", "muxtwist"])


def _why_no_namespaces() -> str | None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs root on Linux (network and mount namespaces)"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.path.isdir("/etc/iproute2"):
        return "no /etc/iproute2 to mount the test's table names over"
    return None


def run_group(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a process group of its own, stopped with everything it started if it outlives WAIT."""
    proc = subprocess.Popen(
        list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=WAIT)
    finally:
        stop_group(proc)
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


class RouteTableTests(unittest.SynchronousTestCase):
    """doctor's policy-route check against a real ``ip`` in a throwaway network namespace."""

    skip = _why_no_namespaces()

    def route_findings(self, rt_tables: dict[str, str], setup: Sequence[str]) -> list[dict[str, Any]]:
        """
        The IPv4 route findings after ``setup`` (ip commands) in a new network
        namespace, with ``rt_tables`` (file name: text) as the table names:
        doctor reads them from the directory it is given, and ip, which reads
        only /etc/iproute2, from that directory mounted there in a mount
        namespace of the same process.
        """
        iproute2 = self.mktemp()
        for name, text in rt_tables.items():
            os.makedirs(os.path.dirname(os.path.join(iproute2, name)), exist_ok=True)
            with open(os.path.join(iproute2, name), "w") as f:
                f.write(text)
        os.makedirs(iproute2, exist_ok=True)
        code = (
            "import attrs, json, sys\n"
            "from muxtwist.doctor import _check_route\n"
            "print(json.dumps([attrs.asdict(f) for f in _check_route(4, [sys.argv[1]])]))\n"
        )
        script = [
            "set -e",
            f"mount --bind {shlex.quote(os.path.abspath(iproute2))} /etc/iproute2",
            "ip link set lo up",
            *setup,
            'exec "$@"',
        ]
        unshare = ["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script), "sh"]
        python = ["env", f"PYTHONPATH={ROOT}", sys.executable, "-c", code, os.path.abspath(iproute2)]
        done = run_group([*unshare, *python])
        self.assertEqual(done.returncode, 0, done.stderr)
        findings: list[dict[str, Any]] = json.loads(done.stdout)
        return findings

    def test_a_named_table_holding_the_local_route_is_in_place(self) -> None:
        """'ip rule add fwmark 0x1 lookup muxtwist' with '100 muxtwist' in rt_tables.d passes, named as ip prints it."""
        rule, route = self.route_findings(
            {"rt_tables.d/muxtwist.conf": "100 muxtwist\n"},
            ["ip rule add fwmark 0x1 lookup muxtwist", "ip route add local default dev lo table muxtwist"],
        )
        self.assertEqual((rule["ok"], route["ok"]), (True, True), (rule, route))
        self.assertEqual(rule["what"], "IPv4 rule: packets marked 0x1 use table muxtwist (100)")
        self.assertEqual(route["what"], "IPv4 table muxtwist (100): deliver everything locally")

    def test_a_named_table_without_the_route_gets_the_docs_command(self) -> None:
        """A rule to a named table that lacks the local route: the rule counts, and the fix is the docs' route line."""
        rule, route = self.route_findings({"rt_tables": "100\tmuxtwist\n"}, ["ip rule add fwmark 0x1 lookup muxtwist"])
        self.assertTrue(rule["ok"], rule)
        self.assertFalse(route["ok"], route)
        self.assertEqual(route["commands"], ["ip -4 route replace local 0.0.0.0/0 dev lo table 100"])

    def test_another_table_number_holding_the_local_route_is_in_place(self) -> None:
        """A rule to table 200 (no name) whose table holds the local route passes."""
        rule, route = self.route_findings(
            {}, ["ip rule add fwmark 0x1 lookup 200", "ip route add local default dev lo table 200"]
        )
        self.assertEqual((rule["ok"], route["ok"]), (True, True), (rule, route))
        self.assertIn("use table 200", rule["what"])

    def test_another_table_number_without_the_route_is_named(self) -> None:
        """A rule to table 200 that holds another default route: that table is named, and fixed in place."""
        rule, route = self.route_findings(
            {}, ["ip rule add fwmark 0x1 lookup 200", "ip route add unreachable default table 200"]
        )
        self.assertTrue(rule["ok"], rule)
        self.assertFalse(route["ok"], route)
        self.assertIn("table 200 has no 'local default dev lo' route (it has: unreachable default", route["detail"])
        self.assertEqual(route["commands"], ["ip -4 route replace local 0.0.0.0/0 dev lo table 200"])

    def test_an_empty_table_is_passed_over_as_the_kernel_does(self) -> None:
        """Of two rules for the mark, an empty first table falls through to the second, which holds the route."""
        rule, route = self.route_findings(
            {},
            [
                "ip rule add fwmark 0x1 lookup 200",
                "ip route add local default dev lo table 200",
                "ip rule add fwmark 0x1 lookup 300",  # without a priority: tried before the first
            ],
        )
        self.assertEqual((rule["ok"], route["ok"]), (True, True), (rule, route))
        self.assertIn("use table 200", rule["what"])

    def test_no_rule_gets_the_docs_commands(self) -> None:
        """With no rule for the mark, the rule and the route printed are the docs' ones, with table 100."""
        rule, route = self.route_findings({"rt_tables": "100 muxtwist\n"}, [])
        self.assertEqual((rule["ok"], route["ok"]), (False, False))
        self.assertEqual(rule["commands"], ["ip -4 rule add fwmark 0x1 lookup 100"])
        self.assertEqual(route["commands"], ["ip -4 route replace local 0.0.0.0/0 dev lo table 100"])


def _why_no_setpriv() -> str | None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs root on Linux (to drop capabilities)"
    if shutil.which("setpriv") is None:
        return "setpriv is not installed"
    return None


class CapabilityTests(unittest.SynchronousTestCase):
    """doctor's capability finding, in a process that holds only the capabilities given."""

    skip = _why_no_setpriv()

    def capability_finding(self, *capabilities: str) -> dict[str, Any]:
        caps = ",".join(["-all", *(f"+{c}" for c in capabilities)])
        code = (
            "import attrs, json\n"
            "from muxtwist.doctor import _check_capability\n"
            "print(json.dumps(attrs.asdict(_check_capability())))\n"
        )
        setpriv = ["setpriv", f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set={caps}", "--"]
        done = run_group([*setpriv, "env", f"PYTHONPATH={ROOT}", sys.executable, "-c", code])
        self.assertEqual(done.returncode, 0, done.stderr)
        finding: dict[str, Any] = json.loads(done.stdout)
        return finding

    def test_cap_net_raw_alone_is_enough_and_named(self) -> None:
        """With CAP_NET_RAW only, the capability is in place, and its line names CAP_NET_RAW."""
        finding = self.capability_finding("net_raw")
        self.assertTrue(finding["ok"], finding)
        self.assertEqual(finding["what"], "capability CAP_NET_RAW or CAP_NET_ADMIN (IP_TRANSPARENT, SO_MARK)")

    def test_cap_net_admin_alone_is_enough(self) -> None:
        """With CAP_NET_ADMIN only, the capability is in place too."""
        finding = self.capability_finding("net_admin")
        self.assertTrue(finding["ok"], finding)

    def test_without_either_the_finding_says_what_is_needed_and_how(self) -> None:
        """With neither capability, the finding says either one is needed and gives the systemd line for CAP_NET_RAW."""
        finding = self.capability_finding()
        self.assertFalse(finding["ok"], finding)
        self.assertIn("needs CAP_NET_RAW or CAP_NET_ADMIN (to set IP_TRANSPARENT and SO_MARK)", finding["detail"])
        self.assertIn("AmbientCapabilities=CAP_NET_RAW;", finding["detail"])
        self.assertIn("setcap cap_net_raw+ep", finding["detail"])


class OlderKernelTests(unittest.SynchronousTestCase):
    """A kernel older than 5.17, which takes only CAP_NET_ADMIN for SO_MARK, simulated by refusing SO_MARK alone."""

    skip = None if sys.platform.startswith("linux") else "Linux only"

    def test_a_refused_so_mark_asks_for_cap_net_admin(self) -> None:
        """When IP_TRANSPARENT is allowed but SO_MARK is not, the finding asks for CAP_NET_ADMIN, naming SO_MARK."""
        allowed = socket.socket.setsockopt

        def older_kernel(sock: socket.socket, level: int, option: int, *value: Any) -> None:
            if (level, option) == (socket.SOL_SOCKET, muxtwist.transparent._SO_MARK):
                raise PermissionError(1, "Operation not permitted")
            allowed(sock, level, option, *value)

        self.patch(socket.socket, "setsockopt", older_kernel)
        finding = _check_capability()
        self.assertFalse(finding.ok)
        self.assertIn("this kernel lets only CAP_NET_ADMIN set SO_MARK", finding.detail)
        self.assertIn("AmbientCapabilities=CAP_NET_ADMIN;", finding.detail)
