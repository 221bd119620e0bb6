"""
Tests for muxtwist.config: loading rules.py and the one clear error for each kind of mistake.
"""

from __future__ import annotations

import codecs
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Generator
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web import http

from muxtwist.config import ConfigError, load_config
from muxtwist.service import MuxService
from tests.certs import make_ca, make_certificate
from tests.processes import stop_group
from tests.twistd import ROOT, free_port, twistd_command

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
            "sniff_timeout = 'soon'": "sniff_timeout must be a finite number more than 0, got 'soon'",
            "sniff_timeout = 0": "sniff_timeout must be a finite number more than 0, got 0",
            "max_sniff_bytes = 1.5": "max_sniff_bytes must be a positive integer",
            "max_connections = -1": "max_connections must be a positive integer or None",
            "shutdown_timeout = True": "shutdown_timeout must be a non-negative finite number",
            "on_timeout = 42": "on_timeout must be an IProtocolFactory",
            "accept_proxy_protocol = '10.0.0.0/8'": "accept_proxy_protocol must be a list of CIDRs",
            "accept_proxy_protocol = ['10.0.0.300/8']": "not an IP network",
            "log_connections = 'yes'": "log_connections must be True or False",
        }
        for line, problem in cases.items():
            error = self.broken(f"rules = [Rule(HTTP1(), echo)]\n{line}\n")
            self.assertIn(problem, error.problem, line)
            self.assertEqual(error.line, HEADER.count("\n") + 2, line)

    def test_settings_that_are_not_finite_are_refused(self) -> None:
        """NaN and infinity are refused for every seconds setting, naming what is expected."""
        for line in (
            "sniff_timeout = float('nan')",
            "sniff_timeout = float('inf')",
            "shutdown_timeout = float('nan')",
            "shutdown_timeout = float('inf')",
        ):
            error = self.broken(f"rules = [Rule(HTTP1(), echo)]\n{line}\n")
            self.assertIn("finite number", error.problem, line)
            self.assertEqual(error.line, HEADER.count("\n") + 2, line)

    def test_seconds_settings_beyond_a_float_are_refused(self) -> None:
        """An int too large for a float is refused for each seconds setting (callLater raised OverflowError)."""
        for line in ("sniff_timeout = 10**400", "shutdown_timeout = 10**400"):
            error = self.broken(f"rules = [Rule(HTTP1(), echo)]\n{line}\n")
            self.assertIn("finite number", error.problem, line)
            self.assertEqual(error.line, HEADER.count("\n") + 2, line)

    def test_negative_sniff_timeout_says_more_than_0(self) -> None:
        """A negative sniff_timeout is told what is wanted (more than 0), not 'non-negative', which 0 is."""
        error = self.broken("rules = [Rule(HTTP1(), echo)]\nsniff_timeout = -1\n")
        self.assertEqual(error.problem, "sniff_timeout must be a finite number more than 0, got -1")

    def test_file_that_is_not_utf8(self) -> None:
        """A rules file holding bytes that are not UTF-8 is one error naming the file, the line and the encoding."""
        path = self.mktemp() + "-rules.py"
        with open(path, "wb") as f:
            f.write(HEADER.encode() + b"rules = [Rule(HTTP1(), echo)]\n# na\xefve\n")
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertTrue(str(error).startswith(f"{path}:{HEADER.count(chr(10)) + 2}: "), str(error))
        self.assertIn("not UTF-8", error.problem)

    def test_file_that_calls_sys_exit(self) -> None:
        """A rules file that raises SystemExit is an error at its line, not an exit of the server."""
        error = self.broken("import sys\nsys.exit(3)\n")
        self.assertEqual(error.line, HEADER.count("\n") + 2)
        self.assertIn("SystemExit while loading: 3", error.problem)

    def test_file_with_a_byte_order_mark_that_is_not_utf8(self) -> None:
        """A file that starts with a UTF-8 byte order mark and holds a bad byte names that byte and its line."""
        path = self.mktemp() + "-rules.py"
        with open(path, "wb") as f:
            f.write(b"\xef\xbb\xbf" + HEADER.encode() + b"rules = [Rule(HTTP1(), echo)]\n#\n\xff\n")
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(error.line, HEADER.count("\n") + 3)
        self.assertEqual(error.problem, "the file is not UTF-8 text: byte ff cannot be decoded")

    def test_file_that_raises_any_base_exception(self) -> None:
        """GeneratorExit or a BaseException of the file's own is one error at its line, like SystemExit."""
        for body in ("raise GeneratorExit('gen')\n", "class Boom(BaseException):\n    pass\nraise Boom('boom')\n"):
            error = self.broken(body)
            self.assertEqual(error.line, HEADER.count("\n") + body.count("\n"), body)
            self.assertIn(" while loading: ", error.problem, body)

    def test_file_raising_an_exception_whose_message_fails(self) -> None:
        """An exception whose str() itself raises is still one error at its line, named by its type."""
        error = self.broken(
            "class E(Exception):\n    def __str__(self):\n        raise RuntimeError('no')\nraise E()\n"
        )
        self.assertEqual(error.line, HEADER.count("\n") + 4)
        self.assertTrue(error.problem.startswith("E while loading"), error.problem)

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

    def assignment_line(self, path: str, start: str) -> int:
        """The line of ``path`` that starts with ``start``."""
        with open(path) as f:
            return next(i for i, line in enumerate(f, 1) if line.startswith(start))

    def test_values_that_raise_while_checked_are_one_error(self) -> None:
        """A setting whose __iter__, __len__, items() or attribute lookup raises is an error naming it and its line."""
        cases = [
            ("rules", "class Odd(list):\n    def __iter__(self):\n        raise RuntimeError('no iterating')\n"
             "rules = Odd([Rule(HTTP1(), echo)])\n", "RuntimeError at line"),
            ("rules", "class Odd(list):\n    def __len__(self):\n        raise RuntimeError('no length')\n"
             "rules = Odd([Rule(HTTP1(), echo)])\n", "RuntimeError at line"),
            ("rules", "import sys\nclass Odd(list):\n    def __iter__(self):\n        sys.exit(3)\n"
             "rules = Odd([Rule(HTTP1(), echo)])\n", "SystemExit at line"),
            ("listeners", "class Odd(dict):\n    def items(self):\n        raise RuntimeError('no items')\n"
             "listeners = Odd({'3000': [Rule(HTTP1(), echo)]})\n", "RuntimeError at line"),
            ("accept_proxy_protocol", "class Odd(list):\n    def __iter__(self):\n        raise KeyError('x')\n"
             "rules = []\naccept_proxy_protocol = Odd(['127.0.0.1'])\n", "KeyError at line"),
            ("on_no_match", "class Odd:\n    def __getattribute__(self, name):\n        raise ValueError('no')\n"
             "rules = []\non_no_match = Odd()\n", "ValueError at line"),
        ]  # fmt: skip
        for name, body, said in cases:
            path = self.write(body)
            error = self.assertRaises(ConfigError, load_config, path)
            self.assertTrue(error.problem.startswith(f"{name} could not be checked: "), error.problem)
            self.assertIn(said, error.problem)
            self.assertEqual(error.line, self.assignment_line(path, f"{name} = "), body)

    def test_values_whose_repr_raises_are_named_in_the_error(self) -> None:
        """A wrong value whose __repr__ raises is still one error naming the setting (or the rule) and its line."""
        odd = "class Odd:\n    def __repr__(self):\n        raise RuntimeError('no repr')\n"
        for body, start in [
            ("rules = []\nsniff_timeout = Odd()\n", "sniff_timeout must be a finite number more than 0, got <Odd"),
            ("rules = []\nmax_connections = Odd()\n", "max_connections must be a positive integer or None, got <Odd"),
            ("rules = []\non_timeout = Odd()\n", "on_timeout must be an IProtocolFactory or None, got <Odd"),
            ("rules = [\n    Odd(),\n]\n", "rules[0] is not a Rule: <Odd"),
            ("rules = [Rule(HTTP1(), echo)]\nlisteners = {Odd(): rules}\n", "listeners key <Odd"),
        ]:
            error = self.broken(odd + body)
            self.assertTrue(error.problem.startswith(start), error.problem)
            self.assertIsNotNone(error.line)

    def test_number_subclasses_are_kept_as_plain_numbers(self) -> None:
        """An int or float subclass whose comparisons raise is checked and kept as its plain value."""
        path = self.write("""
            class Odd(int):
                def __eq__(self, other):
                    raise RuntimeError("no eq")
                def __lt__(self, other):
                    raise RuntimeError("no lt")
                __hash__ = int.__hash__
            class OddFloat(float):
                def __le__(self, other):
                    raise RuntimeError("no le")
            rules = []
            max_connections = Odd(5)
            max_sniff_bytes = Odd(100)
            sniff_timeout = OddFloat(1.5)
            shutdown_timeout = OddFloat(2.0)
        """)
        settings = load_config(path).settings
        values = (settings.max_connections, settings.max_sniff_bytes, settings.sniff_timeout, settings.shutdown_timeout)
        self.assertEqual([type(v) for v in values], [int, int, float, float])
        self.assertEqual(values, (5, 100, 1.5, 2.0))

    def test_unknown_coding_declaration_names_its_line(self) -> None:
        """A coding declaration naming an unknown encoding is an error at its line, 1 or 2."""
        for text, line in [
            (b"# -*- coding: nosuch -*-\nrules = []\n", 1),
            (b"#!/usr/bin/env python\n# -*- coding: nosuch -*-\nrules = []\n", 2),
            (b"\xef\xbb\xbf\n# coding: nosuch\nrules = []\n", 2),
        ]:
            path = self.mktemp() + "-rules.py"
            with open(path, "wb") as f:
                f.write(text)
            error = self.assertRaises(ConfigError, load_config, path)
            self.assertEqual(
                (error.line, error.problem),
                (
                    line,
                    "coding 'nosuch' cannot be used for a Python source file: Python knows no encoding of that name",
                ),
                text,
            )

    def test_coding_declaration_against_a_byte_order_mark_names_its_line(self) -> None:
        """A declaration of another encoding after a UTF-8 byte order mark is an error at its line, saying so."""
        path = self.mktemp() + "-rules.py"
        with open(path, "wb") as f:
            f.write(b"\xef\xbb\xbf# coding: latin-1\nrules = []\n")
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(error.line, 1)
        self.assertIn("UTF-8 byte order mark but declares 'latin-1'", error.problem)

    def test_long_coding_declaration_is_shown_cut(self) -> None:
        """A coding declaration naming 100,000 characters is an error at its line showing at most 200 of them."""
        name = b"a" * 100_000
        for text, line in [
            (b"# coding: " + name + b"\nrules = []\n", 1),
            (b"\xef\xbb\xbf\n# coding: latin-1" + name + b"\nrules = []\n", 2),
        ]:
            path = self.mktemp() + "-rules.py"
            with open(path, "wb") as f:
                f.write(text)
            error = self.assertRaises(ConfigError, load_config, path)
            self.assertEqual(error.line, line, text[:40])
            self.assertLess(len(error.problem), 300, error.problem[:100])
            self.assertIn("aaaa", error.problem)

    def test_first_line_that_is_not_utf8_names_its_byte_and_line(self) -> None:
        """A byte that is not UTF-8 on line 1 or 2 is named with its line, as on any later line."""
        for text, line in [(b"rules = []  # r\xe9sum\xe9\n", 1), (b"rules = []\n# na\xefve\n", 2)]:
            path = self.mktemp() + "-rules.py"
            with open(path, "wb") as f:
                f.write(text)
            error = self.assertRaises(ConfigError, load_config, path)
            self.assertEqual(error.line, line, text)
            self.assertIn("the file is not UTF-8 text: byte ", error.problem)

    def test_huge_integers_are_shown_shortened(self) -> None:
        """An integer of thousands of digits is shown as its first digits and its length, in every setting's error."""
        for line in (
            "sniff_timeout = 10**5000",
            "sniff_timeout = -10**4000",
            "shutdown_timeout = 10**5000",
            "max_connections = -10**5000",
            "max_connections_per_source = -10**4000",
            "max_sniff_bytes = -10**5000",
            "log_connections = 10**5000",
            "on_no_match = 10**5000",
            "accept_proxy_protocol = 10**5000",
            "accept_proxy_protocol = [10**5000]",
            "rules = [10**5000]",
        ):
            error = self.broken(f"rules = [Rule(HTTP1(), echo)]\n{line}\n")
            self.assertLessEqual(len(error.problem), 200, line)
            self.assertIn("... (an integer of ", error.problem, line)
            self.assertEqual(error.line, HEADER.count("\n") + 2, line)

    def test_long_values_are_shown_shortened(self) -> None:
        """A long string (a listeners key, a setting of the wrong type) is shown cut to 80 characters."""
        for line in (
            "listeners = {'bogus:' + 'x' * 100000: []}",
            "sniff_timeout = 'x' * 100000",
            "accept_proxy_protocol = ['x' * 100000]",
        ):
            error = self.broken(f"rules = [Rule(HTTP1(), echo)]\n{line}\n")
            self.assertLessEqual(len(error.problem), 500, line)
            self.assertIn("...", error.problem, line)


#: The problem of a rules file declaring a coding that is not ASCII-compatible.
NOT_ASCII = (
    "cannot be used for a Python source file: Python source must be in an ASCII-compatible encoding, and it is not"
    " (save the file as UTF-8)"
)


class RawRulesFileTests(unittest.TestCase):
    """What the tests of a rules file's bytes share: writing it, and running the commands and a reload on it."""

    def write(self, raw: bytes) -> str:
        path = os.path.abspath(self.mktemp() + "-rules.py")
        with open(path, "wb") as f:
            f.write(raw)
        return path

    def assert_check_and_twistd_say(self, path: str, expected: str) -> None:
        """python -m muxtwist check and twistd muxtwist --config both end with ``expected`` and exit 1."""
        commands = [
            [sys.executable, "-m", "muxtwist", "check", path],
            twistd_command("--port", f"tcp:{free_port()}:interface=127.0.0.1", "--config", path),
        ]
        for command in commands:
            proc = subprocess.Popen(
                command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
            )
            try:
                out, err = proc.communicate(timeout=60)
            finally:
                stop_group(proc)
            self.assertEqual((proc.returncode, err.decode(), out), (1, expected, b""), command)

    @defer.inlineCallbacks
    def assert_reloads_keep_the_running_rules(
        self, broken: list[tuple[bytes, str]]
    ) -> Generator[defer.Deferred[Any], Any, None]:
        """
        A service running RELOAD_RULES is reloaded with each of ``broken``
        (the file's bytes, the problem after its path): each reload fails
        with that one line, and the running rules keep serving.
        """
        path = self.write(RELOAD_RULES.encode())
        service = MuxService(config_path=path)
        service.load(load_config(path))
        service.startService()
        self.addCleanup(service.stopService)
        (listener,) = service.listeners.values()
        lines: list[str] = []

        def keep(event: dict[str, Any]) -> None:
            lines.append(formatEvent(event))

        globalLogPublisher.addObserver(keep)
        self.addCleanup(globalLogPublisher.removeObserver, keep)
        for raw, problem in broken:
            with open(path, "wb") as f:
                f.write(raw)
            lines.clear()
            reloaded = yield service.reload()
            self.assertFalse(reloaded)
            self.assertEqual(
                [line for line in lines if "reload failed" in line],
                [f"reload failed, keeping the running rules: {path}:{problem}"],
            )
            self.assertEqual([rule.name for rule in listener.factory.rules], ["one"])


class UnusableCodingTests(RawRulesFileTests):
    """A coding declaration Python source cannot be written in is one error naming the file, the line and why."""

    def test_coding_that_is_not_ascii_compatible_names_its_line(self) -> None:
        """UTF-16, UTF-32 or EBCDIC declared on line 1 or 2 is one error at that line saying why it cannot be used."""
        for coding in ("utf-16", "UTF-32-LE", "utf_16_be", "cp037"):
            for first, line in [(b"", 1), (b"#!/usr/bin/env python3\n", 2), (b"\n", 2)]:
                raw = first + f"# -*- coding: {coding} -*-\nrules = []\n".encode()
                error = self.assertRaises(ConfigError, load_config, self.write(raw))
                self.assertEqual((error.line, error.problem), (line, f"coding {coding!r} {NOT_ASCII}"), raw)

    def test_coding_that_is_not_a_text_encoding_names_its_line(self) -> None:
        """A bytes-to-bytes codec (hex, base64, rot13) declared as the coding is one error at its line."""
        for coding in ("hex", "base64", "rot13"):
            error = self.assertRaises(
                ConfigError, load_config, self.write(f"# coding: {coding}\nrules = []\n".encode())
            )
            self.assertEqual(
                (error.line, error.problem),
                (1, f"coding {coding!r} cannot be used for a Python source file: it is not a text encoding"),
            )

    def test_the_undefined_codec_says_it_refuses_every_byte(self) -> None:
        """The codec "undefined" (which decodes nothing) is said to refuse every byte, not to be ASCII-incompatible."""
        error = self.assertRaises(ConfigError, load_config, self.write(b"# -*- coding: undefined -*-\nrules = []\n"))
        self.assertEqual(
            (error.line, error.problem),
            (
                1,
                "coding 'undefined' cannot be used for a Python source file: that codec refuses every byte, so no"
                " text can be read in it (save the file as UTF-8)",
            ),
        )

    def test_file_saved_as_utf16_names_its_byte_order_mark(self) -> None:
        """A file saved as UTF-16 or UTF-32 (with its byte order mark) is one error at line 1 saying so."""
        for encoding, wide in [("utf-16", "UTF-16"), ("utf-16-be", "UTF-16"), ("utf-32", "UTF-32")]:
            text = "# -*- coding: utf-16 -*-\nrules = []\n"
            raw = text.encode(encoding) if encoding != "utf-16-be" else codecs.BOM_UTF16_BE + text.encode(encoding)
            error = self.assertRaises(ConfigError, load_config, self.write(raw))
            self.assertEqual(
                (error.line, error.problem),
                (
                    1,
                    f"the file is {wide} text (it starts with a {wide} byte order mark): Python source must be in an"
                    " ASCII-compatible encoding (save the file as UTF-8)",
                ),
            )

    def test_ascii_compatible_codings_still_load(self) -> None:
        """Codings Python reads source in (Latin-1, cp1252, EUC-JP, UTF-7) load as before, non-ASCII comments too."""
        for coding in ("latin-1", "cp1252", "euc-jp", "utf-7", "utf-8"):
            raw = f"# -*- coding: {coding} -*-\n# \u00e9t\u00e9\nrules = []\n".encode(coding)
            self.assertEqual(load_config(self.write(raw)).rules, ())

    def test_check_and_twistd_say_it_in_one_line(self) -> None:
        """python -m muxtwist check and twistd muxtwist --config both end with the one line and exit 1."""
        path = self.write(b"# -*- coding: utf-16 -*-\nrules = []\n")
        self.assert_check_and_twistd_say(path, f"muxtwist: {path}:1: coding 'utf-16' {NOT_ASCII}\n")

    @defer.inlineCallbacks
    def test_reload_keeps_the_running_rules(self) -> Generator[defer.Deferred[Any], Any, None]:
        """At a reload (SIGHUP) such a file logs the one error and the running rules keep serving."""
        two = RELOAD_RULES.replace("one", "two")
        yield self.assert_reloads_keep_the_running_rules(
            [
                (f"# coding: utf-16\n{two}".encode(), f"1: coding 'utf-16' {NOT_ASCII}"),
                (
                    f"# coding: hex\n{two}".encode(),
                    "1: coding 'hex' cannot be used for a Python source file: it is not a text encoding",
                ),
            ]
        )


#: The problem of a rules file saved as UTF-16 or UTF-32 without a byte order mark, by the encoding it looks like.
def no_mark(looks_like: str) -> str:
    return (
        f"the file contains NUL bytes: it is probably {looks_like} text without a byte order mark; Python source"
        " must be in an ASCII-compatible encoding (save the file as UTF-8)"
    )


class NulBytesTests(RawRulesFileTests):
    """A rules file holding NUL bytes (a wide encoding without its byte order mark) is one error naming the file."""

    def test_wide_text_without_a_byte_order_mark_says_what_it_probably_is(self) -> None:
        """UTF-16 or UTF-32 without a byte order mark is one error at line 1 saying so and to save it as UTF-8."""
        text = "# r\u00e8gles\nrules = []\n"
        for encoding, looks_like in [
            ("utf-16-le", "UTF-16 (little-endian)"),
            ("utf-16-be", "UTF-16 (big-endian)"),
            ("utf-32-le", "UTF-32 (little-endian)"),
            ("utf-32-be", "UTF-32 (big-endian)"),
        ]:
            for raw in (text.encode(encoding), ("\n\n" + text).encode(encoding), text.encode(encoding)[:-1]):
                error = self.assertRaises(ConfigError, load_config, self.write(raw))
                self.assertEqual((error.line, error.problem), (1, no_mark(looks_like)), (encoding, raw))

    def test_a_stray_nul_byte_names_its_line(self) -> None:
        """A NUL byte in an otherwise UTF-8 file (or a file of NULs) is one error at the first NUL's line."""
        for raw, line in [
            (b"rules = []\n\nx = 1\x00\n", 3),
            (b"\x00" * 4096, 1),
            (b"rules = []\n" + b"\x00" * 4096, 2),
            (b"# -*- coding: latin-1 -*-\nrules = []  # \xe9\x00\n", 2),
        ]:
            error = self.assertRaises(ConfigError, load_config, self.write(raw))
            self.assertEqual(
                (error.line, error.problem),
                (line, "the file contains a NUL byte, which Python source cannot contain"),
                raw[:40],
            )

    def test_a_file_larger_than_the_limit_is_one_error_saying_so(self) -> None:
        """A rules file past MAX_RULES_FILE_BYTES is one error saying so, not read whole (/dev/zero is endless)."""
        from muxtwist.config import MAX_RULES_FILE_BYTES

        comment = b"# " + b"x" * 1021 + b"\n"
        body = b"rules = []\n" + comment * (MAX_RULES_FILE_BYTES // len(comment))
        load_config(self.write(body[:MAX_RULES_FILE_BYTES]))  # up to the limit: read
        error = self.assertRaises(ConfigError, load_config, self.write(body + comment))
        self.assertEqual(
            (error.line, error.problem),
            (None, f"the file is larger than {MAX_RULES_FILE_BYTES // 2**20} MiB: not read (is it a rules file?)"),
        )

    def test_a_pipe_or_a_device_is_one_error_at_once(self) -> None:
        """A named pipe or a device given as the rules file is one error, without waiting to open or read it."""
        fifo = os.path.abspath(self.mktemp() + "-rules.py")
        os.mkfifo(fifo)

        def unblock() -> None:
            # Without the check, open() would wait for a writer: this one comes
            # 2 s later. Opened without waiting for a reader: with the check
            # there is none, and the thread ends at once (ENXIO).
            done.wait(2)
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

        done = threading.Event()
        writer = threading.Thread(target=unblock, daemon=True)
        writer.start()
        self.addCleanup(writer.join, 10)
        self.addCleanup(done.set)
        problem = "not a regular file (a pipe, a device or a socket): rules are read from a file"
        for path in (fifo, "/dev/zero"):
            started = time.monotonic()
            error = self.assertRaises(ConfigError, load_config, path)
            self.assertEqual((error.line, error.problem), (None, problem), path)
            self.assertLess(time.monotonic() - started, 1.0, path)

    def test_check_and_twistd_say_it_in_one_line(self) -> None:
        """python -m muxtwist check and twistd muxtwist --config both end with the one line and exit 1."""
        path = self.write("rules = []\n".encode("utf-16-le"))
        self.assert_check_and_twistd_say(path, f"muxtwist: {path}:1: {no_mark('UTF-16 (little-endian)')}\n")

    @defer.inlineCallbacks
    def test_reload_keeps_the_running_rules(self) -> Generator[defer.Deferred[Any], Any, None]:
        """At a reload (SIGHUP) such a file logs the one error and the running rules keep serving."""
        yield self.assert_reloads_keep_the_running_rules(
            [(RELOAD_RULES.replace("one", "two").encode("utf-32-be"), f"1: {no_mark('UTF-32 (big-endian)')}")]
        )


RELOAD_RULES = """\
from twisted.internet.protocol import Factory, Protocol
from muxtwist import Rule
from muxtwist.matchers import Prefix

listeners = {"tcp:0:interface=127.0.0.1": [Rule(Prefix(b"A"), Factory.forProtocol(Protocol), name="one")]}
"""


class WarningTests(unittest.TestCase):
    """Usable files with a probable mistake load, with a warning naming it."""

    def write(self, body: str) -> str:
        path = self.mktemp() + "-rules.py"
        with open(path, "w") as f:
            f.write(HEADER + textwrap.dedent(body))
        return path

    def test_misspelled_settings_name_the_closest_setting(self) -> None:
        """snif_timeout and on_timout are not read; the warning names the setting meant and its line."""
        path = self.write("rules = [Rule(HTTP1(), echo)]\nsnif_timeout = 2\non_timout = echo\nhelper_page = 3\n")
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        config = load_config(path)
        problems = [(w.line, w.kind, w.problem) for w in config.warnings]
        first = HEADER.count("\n") + 2
        self.assertEqual(
            problems,
            [
                (first, "misspelled", "'snif_timeout' is not a setting and is ignored; did you mean 'sniff_timeout'?"),
                (first + 1, "misspelled", "'on_timout' is not a setting and is ignored; did you mean 'on_timeout'?"),
            ],
        )
        self.assertEqual(config.settings.sniff_timeout, 5.0)
        logged = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len([t for t in logged if "did you mean" in t]), 2, logged)
        self.assertIn(f"{path}:{first}: 'snif_timeout'", logged[0])

    def test_no_rules_and_no_catch_all_is_a_warning(self) -> None:
        """An empty rules list, or a listener with none, and no on_no_match/on_timeout: a warning naming it."""
        first = HEADER.count("\n") + 1
        config = load_config(self.write('rules = []\nlisteners = {"tcp:0": []}\n'))
        self.assertEqual(
            [(w.line, w.kind, w.problem) for w in config.warnings],
            [
                (
                    first,
                    "empty",
                    "rules is empty and there is no on_no_match or on_timeout: every connection is closed",
                ),
                (
                    first + 1,
                    "empty",
                    "listener tcp:0 has no rules and there is no on_no_match or on_timeout: every connection is closed",
                ),
            ],
        )
        # With a catch-all, or rules, or no rules list at all: nothing to say.
        for body in ("rules = []\non_no_match = echo\n", "rules = []\non_timeout = echo\n",
                     'listeners = {"tcp:0": [Rule(HTTP1(), echo)]}\n'):  # fmt: skip
            self.assertEqual([w.kind for w in load_config(self.write(body)).warnings], [], body)

    def test_warnings_are_not_logged_as_python_warnings(self) -> None:
        """A rules-file warning is logged without a ``warning`` field, which trial's reporter reads as warnings.warn."""
        path = self.write("rules = [Rule(HTTP1(), echo)]\nsnif_timeout = 2\n")
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        load_config(path)
        logged = [e for e in events if "did you mean" in (formatEvent(e) or "")]
        self.assertEqual(len(logged), 1)
        self.assertNotIn("warning", logged[0])

    def test_stream_matchers_on_a_udp_listener(self) -> None:
        """TLS() on a UDP listener (also inside AnyOf/Not) warns once per rule; DNS(), QUIC() and Prefix() do not."""
        body = """
            from twisted.internet.protocol import DatagramProtocol
            from muxtwist.matchers import DNS, QUIC, TLS, AnyOf, Not, Prefix, SSH
            udp = "udp:5353:interface=127.0.0.1"
            listeners = {
                udp: [
                    Rule(TLS(), DatagramProtocol(), name="tls"),
                    Rule(AnyOf(DNS(), Not(SSH())), DatagramProtocol(), name="nested"),
                    Rule(AnyOf(QUIC(), Prefix(b"x")), DatagramProtocol(), name="fine"),
                ],
                "tcp:4000": [Rule(TLS(), echo, name="tcp-tls")],
            }
        """
        config = load_config(self.write(body))
        self.assertEqual([w.kind for w in config.warnings], ["udp", "udp"])
        self.assertIn("rule 'tls' of 'udp:5353:interface=127.0.0.1' uses TLS()", config.warnings[0].problem)
        self.assertIn("rule 'nested' of 'udp:5353:interface=127.0.0.1' uses SSH()", config.warnings[1].problem)
        self.assertIn("QUIC() or DTLS()", config.warnings[0].problem)

    def test_h2_offered_to_a_site_without_http2_support(self) -> None:
        """Without Twisted's HTTP/2 support, a TerminateTLS offering h2 in front of a Site gets one clear warning."""
        folder = self.mktemp()
        os.mkdir(folder)
        pair = make_certificate("a.test", ca=make_ca())
        with open(os.path.join(folder, "a.test.pem"), "wb") as f:
            f.write(pair.cert_pem + pair.key_pem)
        body = f"""
            from twisted.web.resource import Resource
            from twisted.web.server import Site
            from muxtwist import SniffingFactory
            from muxtwist.actions import TerminateTLS
            from muxtwist.matchers import TLS, Any
            rules = [Rule(TLS(), TerminateTLS({folder!r}, SniffingFactory([Rule(Any(), Site(Resource()))]),
                                               alpn=["h2", "http/1.1"]), name="tls")]
        """
        self.patch(http, "H2_ENABLED", False)
        config = load_config(self.write(body))
        self.assertEqual([w.kind for w in config.warnings], ["h2"])
        self.assertIn("cannot speak HTTP/2", config.warnings[0].problem)
        self.assertIn('pip install "Twisted[http2]"', config.warnings[0].problem)
        self.patch(http, "H2_ENABLED", True)
        self.assertEqual(load_config(self.write(body)).warnings, ())


class StreamMatchersOnUDPTests(unittest.TestCase):
    """The stream-matcher warning of UDP listeners, at any depth and never for third-party matchers."""

    write = WarningTests.write

    def test_a_stream_matcher_nested_deep_is_found(self) -> None:
        """TLS() wrapped twelve combinators deep in a UDP listener's rule still gets its warning."""
        body = """
            from twisted.internet.protocol import DatagramProtocol
            from muxtwist.matchers import TLS, AnyOf, Not, Prefix
            deep = TLS()
            for i in range(12):
                deep = Not(deep) if i % 2 else AnyOf(Prefix(b"x"), deep)
            listeners = {"udp:5353:interface=127.0.0.1": [Rule(deep, DatagramProtocol(), name="deep")]}
        """
        config = load_config(self.write(body))
        self.assertEqual([w.kind for w in config.warnings], ["udp"])
        self.assertIn("rule 'deep' of 'udp:5353:interface=127.0.0.1' uses TLS()", config.warnings[0].problem)

    def test_third_party_matchers_named_like_ours_are_not_flagged(self) -> None:
        """A matcher class of another module named TLS, or a subclass of ours, nested or not, gets no warning."""
        body = """
            from twisted.internet.protocol import DatagramProtocol
            from zope.interface import implementer
            from muxtwist.interfaces import IMatcher, Verdict
            from muxtwist.matchers import TLS as OurTLS, AnyOf, Prefix

            @implementer(IMatcher)
            class TLS:
                name = "theirs"

                def match(self, data, info):
                    return Verdict.NO_MATCH

            class Mine(OurTLS):
                pass

            listeners = {
                "udp:5353:interface=127.0.0.1": [
                    Rule(TLS(), DatagramProtocol(), name="theirs"),
                    Rule(AnyOf(Prefix(b"x"), TLS()), DatagramProtocol(), name="nested"),
                    Rule(Mine(), DatagramProtocol(), name="subclass"),
                ]
            }
        """
        self.assertEqual(list(load_config(self.write(body)).warnings), [])
