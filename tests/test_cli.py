"""
Tests for ``python -m muxtwist check`` and ``explain`` (muxtwist.cli).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

from twisted.trial import unittest

from muxtwist.cli import main
from tests.twistd import ROOT

RULES = """\
from twisted.internet.protocol import Factory, Protocol

from muxtwist import Rule
from muxtwist.matchers import HTTP1, Prefix

rules = [
    Rule(HTTP1(host="a.test"), Factory.forProtocol(Protocol), name="site-a"),
    Rule(Prefix(b"SSH-"), Factory.forProtocol(Protocol), name="ssh", max_connections=5),
]
listeners = {"tcp:4001": [Rule(Prefix(b"X"), Factory.forProtocol(Protocol), name="x")]}
sniff_timeout = 2.0
max_connections_per_source = 10
"""


class CLITests(unittest.TestCase):
    """check and explain, called in process and as ``python -m muxtwist``."""

    def write(self, text: str) -> str:
        path = self.mktemp() + ".py"
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path

    def run_main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(list(argv), out, err)
        return code, out.getvalue(), err.getvalue()

    def test_check_good(self) -> None:
        """check prints every listener with its rules in order, the settings, and exits 0."""
        code, out, _ = self.run_main("check", self.write(RULES), "--port", "4000")
        self.assertEqual(code, 0)
        self.assertIn("listener tcp:4000:", out)
        self.assertIn("listener tcp:4001:", out)
        self.assertLess(out.index("1. site-a"), out.index("2. ssh"))
        self.assertIn("(max_connections=5)", out)
        self.assertIn("sniff_timeout = 2.0", out)
        self.assertIn("max_connections_per_source = 10", out)

    def test_check_broken(self) -> None:
        """check names the file, line and problem of a broken file and exits 1."""
        path = self.write("from muxtwist import Rule\nrules = [\n    'not a rule',\n]\n")
        code, out, err = self.run_main("check", path)
        self.assertEqual(code, 1)
        self.assertIn(f"{path}:3:", err)
        self.assertIn("is not a Rule", err)

    def test_explain_winner(self) -> None:
        """explain shows each verdict in order up to the winner, and the winner."""
        request = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
        code, out, _ = self.run_main("explain", self.write(RULES), "--hex", request.hex())
        self.assertEqual(code, 0)
        self.assertIn("1. site-a: MATCH", out)
        self.assertIn("2. ssh: not evaluated", out)
        self.assertIn("winner: site-a", out)

    def test_explain_order(self) -> None:
        """A later rule wins only after every earlier one said NO_MATCH."""
        code, out, _ = self.run_main("explain", self.write(RULES), "--hex", b"SSH-2.0-x\r\n".hex())
        self.assertEqual(code, 0)
        self.assertIn("1. site-a: NO_MATCH", out)
        self.assertIn("2. ssh: MATCH", out)

    def test_explain_need_more_and_no_match(self) -> None:
        """Undecided bytes say who is waiting and where the connection goes if nothing more comes."""
        path = self.write(RULES)
        code, out, _ = self.run_main("explain", path, "--hex", b"GE".hex())
        self.assertEqual(code, 2)
        self.assertIn("1. site-a: NEED_MORE", out)
        self.assertIn("needs more bytes", out)
        self.assertIn("nothing more (timeout or end of stream): on_no_match", out)
        code, out, _ = self.run_main("explain", path, "--hex", "00 01 02")
        self.assertEqual(code, 2)
        self.assertIn("on_no_match", out)

    def test_explain_file_and_listener(self) -> None:
        """--file reads a capture; --listener picks that listener's rules."""
        capture = self.mktemp()
        with open(capture, "wb") as f:
            f.write(b"XYZ")
        code, out, _ = self.run_main("explain", self.write(RULES), "--file", capture, "--listener", "4001")
        self.assertEqual(code, 0)
        self.assertIn("winner: x", out)
        code, _, err = self.run_main("explain", self.write(RULES), "--file", capture, "--listener", "4999")
        self.assertEqual(code, 1)
        self.assertIn("no listener", err)

    def test_module_entry_point(self) -> None:
        """``python -m muxtwist check`` runs as a command with the right exit codes."""
        good = subprocess.run(
            [sys.executable, "-m", "muxtwist", "check", self.write(RULES)],
            cwd=ROOT,
            capture_output=True,
            timeout=30,
            env=dict(os.environ),
        )
        self.assertEqual(good.returncode, 0, good.stderr)
        self.assertIn(b"OK", good.stdout)
        bad = subprocess.run(
            [sys.executable, "-m", "muxtwist", "check", self.write("rules = 3\n")],
            cwd=ROOT,
            capture_output=True,
            timeout=30,
        )
        self.assertEqual(bad.returncode, 1)
