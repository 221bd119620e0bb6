"""
Tests for muxtwist.config: loading rules.py and the one clear error for each kind of mistake.
"""

from __future__ import annotations

import os
import textwrap

from twisted.internet.protocol import Factory
from twisted.trial import unittest

from muxtwist.config import ConfigError, load_config

HEADER = """\
from twisted.internet.protocol import Factory, Protocol
from muxtwist import Rule
from muxtwist.matchers import HTTP1, Prefix
echo = Factory.forProtocol(Protocol)
"""


class LoaderTests(unittest.TestCase):
    def write(self, body: str) -> str:
        path = os.path.join(self.mktemp() + "-rules.py")
        with open(path, "w") as f:
            f.write(HEADER + textwrap.dedent(body))
        return path

    def broken(self, body: str) -> ConfigError:
        path = self.write(body)
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertTrue(str(error).startswith(path), str(error))
        return error

    def test_every_name(self) -> None:
        """Every module-level name of DESIGN.md is read."""
        path = self.write("""
            rules = [Rule(HTTP1(), echo, name="web"), Rule(Prefix(b"E"), echo)]
            listeners = {"3001": [Rule(Prefix(b"X"), echo)], "tcp:3002:interface=127.0.0.1": rules}
            sniff_timeout = 2.5
            max_sniff_bytes = 4096
            on_timeout = echo
            on_no_match = echo
            max_connections = 100
            shutdown_timeout = 7
            accept_proxy_protocol = ["127.0.0.1/32"]
        """)
        config = load_config(path)
        assert config.rules is not None
        self.assertEqual([r.name for r in config.rules], ["web", "prefix"])
        self.assertEqual(sorted(config.listeners), ["tcp:3001", "tcp:3002:interface=127.0.0.1"])
        s = config.settings
        self.assertEqual(
            (s.sniff_timeout, s.max_sniff_bytes, s.max_connections, s.shutdown_timeout), (2.5, 4096, 100, 7)
        )
        self.assertIsInstance(s.on_timeout, Factory)
        self.assertIs(s.on_timeout, s.on_no_match)
        self.assertEqual(s.accept_proxy_protocol, ("127.0.0.1/32",))

    def test_syntax_error(self) -> None:
        """A syntax error names the line."""
        error = self.broken("rules = [\n  Rule(HTTP1(), echo\n")
        self.assertIn("syntax error", error.problem)
        self.assertIsNotNone(error.line)

    def test_exception_while_importing(self) -> None:
        """An exception raised by the file names its line and the exception."""
        error = self.broken("x = 1\nrules = [Rule(HTTP1(), echo)]\nraise RuntimeError('no database')\n")
        self.assertEqual(error.line, HEADER.count("\n") + 3)
        self.assertIn("RuntimeError", error.problem)
        self.assertIn("no database", error.problem)

    def test_missing_rules_and_listeners(self) -> None:
        """A file without rules or listeners says so."""
        error = self.broken("sniff_timeout = 1\n")
        self.assertIn("neither 'rules' nor 'listeners'", error.problem)

    def test_rule_that_is_not_a_rule(self) -> None:
        """An item that is not a Rule is named with its line."""
        error = self.broken("rules = [\n    Rule(HTTP1(), echo),\n    (HTTP1(), echo),\n]\n")
        self.assertIn("rules[1] is not a Rule", error.problem)
        self.assertEqual(error.line, HEADER.count("\n") + 3)

    def test_factory_that_is_not_a_factory(self) -> None:
        """A Rule whose factory is not an IProtocolFactory is refused at its line."""
        error = self.broken("rules = [Rule(HTTP1(), 'not a factory')]\n")
        self.assertIn("IProtocolFactory", error.problem)
        self.assertEqual(error.line, HEADER.count("\n") + 1)

    def test_matcher_that_is_not_a_matcher(self) -> None:
        """A Rule whose matcher is not an IMatcher is refused at its line."""
        error = self.broken("rules = [Rule(lambda d: True, echo)]\n")
        self.assertIn("IMatcher", error.problem)

    def test_bad_endpoint(self) -> None:
        """A listeners key that is not an endpoint description is refused."""
        error = self.broken("listeners = {'bogus:nothing': [Rule(HTTP1(), echo)]}\n")
        self.assertIn("bad endpoint description 'bogus:nothing'", error.problem)
        self.assertEqual(error.line, HEADER.count("\n") + 1)

    def test_wrong_typed_settings(self) -> None:
        """Each setting of the wrong type is refused with its name and line."""
        cases = {
            "sniff_timeout = 'soon'": "sniff_timeout must be a non-negative number",
            "sniff_timeout = 0": "sniff_timeout must be more than 0",
            "max_sniff_bytes = 1.5": "max_sniff_bytes must be a positive integer",
            "max_connections = -1": "max_connections must be a positive integer or None",
            "shutdown_timeout = True": "shutdown_timeout must be a non-negative number",
            "on_timeout = 42": "on_timeout must be an IProtocolFactory",
            "accept_proxy_protocol = '10.0.0.0/8'": "accept_proxy_protocol must be a list of CIDRs",
            "accept_proxy_protocol = ['10.0.0.300/8']": "not an IP network",
            "log_connections = 'yes'": "log_connections must be True or False",
        }
        for line, problem in cases.items():
            error = self.broken(f"rules = [Rule(HTTP1(), echo)]\n{line}\n")
            self.assertIn(problem, error.problem, line)
            self.assertEqual(error.line, HEADER.count("\n") + 2, line)

    def test_missing_file(self) -> None:
        """A file that cannot be read is one clear error."""
        error = self.assertRaises(ConfigError, load_config, "/nonexistent/rules.py")
        self.assertIn("cannot read", str(error))

    def test_imports_beside_the_file(self) -> None:
        """A rules file can import a module that sits beside it."""
        path = self.write("from helper_mod_beside import RULES as rules\n")
        with open(os.path.join(os.path.dirname(path), "helper_mod_beside.py"), "w") as f:
            f.write(HEADER + "RULES = [Rule(Prefix(b'Z'), echo)]\n")
        config = load_config(path)
        assert config.rules is not None
        self.assertEqual(len(config.rules), 1)
