"""
Tests for ``python -m muxtwist check`` and ``explain`` (muxtwist.cli).
"""

from __future__ import annotations

import io
import os
import resource
import socket
import subprocess
import sys
import textwrap

from twisted.trial import unittest

from muxtwist.cli import main
from tests.processes import output_after_stop, stop_group
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
        # Absolute: the subprocesses below run in the checkout, not in the test's directory.
        path = os.path.abspath(self.mktemp()) + ".py"
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
        self.assertIn("nothing more (timeout or end of stream): the connection will be closed (on_no_match", out)
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

    def test_check_of_a_rules_list_that_raises_is_one_line(self) -> None:
        """check (in process and as ``python -m muxtwist``) of rules whose __iter__ raises is one line and exit 1."""
        path = self.write(
            """\
            class Odd(list):
                def __iter__(self):
                    raise RuntimeError("no iterating")
            rules = Odd()
            """
        )
        expected = f"muxtwist: {path}:4: rules could not be checked: RuntimeError at line 3: no iterating"
        code, out, err = self.run_main("check", path)
        self.assertEqual((code, out, err), (1, "", expected + "\n"))
        done = subprocess.run(
            [sys.executable, "-m", "muxtwist", "check", path], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
        self.assertEqual((done.returncode, done.stdout, done.stderr), (1, "", expected + "\n"))

    def test_check_shows_huge_and_unprintable_values_shortened(self) -> None:
        """check of a usable file shows a huge limit, and a matcher and factory whose repr raises, in a few words."""
        path = self.write(
            """\
            from twisted.internet.protocol import Factory, Protocol
            from zope.interface import implementer
            from muxtwist import Rule
            from muxtwist.interfaces import IMatcher, Verdict

            @implementer(IMatcher)
            class Mine:
                name = "mine"
                def match(self, data, info):
                    return Verdict.MATCH
                def __repr__(self):
                    raise RuntimeError("no repr")

            class Odd(Factory):
                protocol = Protocol
                def __repr__(self):
                    raise RuntimeError("no repr")

            rules = [Rule(Mine(), Odd())]
            on_no_match = Odd()
            max_connections = 10**5000
            """
        )
        code, out, err = self.run_main("check", path)
        self.assertEqual(code, 0, err)
        self.assertIn("  max_connections = 10000000000000000000... (an integer of 5001 digits)\n", out)
        self.assertIn("  1. mine: <Mine instance at 0x", out)
        self.assertIn("-> <Odd instance at 0x", out)
        self.assertIn("  on_no_match = <Odd instance at 0x", out)


class CheckShowsWhatWasWrittenTests(unittest.TestCase):
    """check shows rules as written and warns about what will not work as meant."""

    def write(self, text: str) -> str:
        path = self.mktemp() + ".py"
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path

    def run_main(self, *argv: str, stdin: object = None) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(list(argv), out, err, stdin)
        return code, out.getvalue(), err.getvalue()

    def test_matchers_shown_with_their_non_default_options(self) -> None:
        """HTTP1(host='a.test') is shown as that, not with the expanded set of every HTTP method."""
        code, out, _ = self.run_main("check", self.write(RULES), "--port", "4000")
        self.assertEqual(code, 0)
        self.assertIn("1. site-a: HTTP1(host='a.test') -> Factory", out)
        self.assertIn("2. ssh: Prefix(prefixes=b'SSH-') -> Factory", out)
        self.assertNotIn("frozenset", out)

    def test_nested_matchers_shown_as_written(self) -> None:
        """Combinators show their inner matchers the same way, without derived names."""
        path = self.write(
            RULES.replace('Prefix(b"SSH-")', 'AnyOf(HTTP1(path="/x"), Not(Prefix(b"Q")))').replace(
                "from muxtwist.matchers import HTTP1, Prefix", "from muxtwist.matchers import HTTP1, AnyOf, Not, Prefix"
            )
        )
        code, out, _ = self.run_main("check", path, "--port", "4000")
        self.assertEqual(code, 0, out)
        self.assertIn("2. ssh: AnyOf(HTTP1(path='/x'), Not(Prefix(prefixes=b'Q'))) -> Factory", out)

    def test_udp_settings_shown_for_udp_listeners_only(self) -> None:
        """check lists max_udp_flows, max_flows_per_source and max_sniff_datagrams when a UDP listener is served."""
        udp = self.write(
            """
            from twisted.internet.protocol import DatagramProtocol
            from muxtwist import Rule
            from muxtwist.matchers import DNS
            listeners = {"udp:5353:interface=127.0.0.1": [Rule(DNS(), DatagramProtocol())]}
            max_flows_per_source = 3
            """
        )
        code, out, _ = self.run_main("check", udp)
        self.assertEqual(code, 0, out)
        self.assertIn("  max_udp_flows = 10000  (default)\n", out)
        self.assertIn("  max_flows_per_source = 3\n", out)
        self.assertIn("  max_sniff_datagrams = 4  (default)\n", out)
        code, out, _ = self.run_main("check", self.write(RULES), "--port", "4000")
        self.assertEqual(code, 0, out)
        self.assertNotIn("max_udp_flows", out)

    def test_misspelled_settings_fail_check(self) -> None:
        """A misspelled setting is a warning naming the setting meant, and check exits 1."""
        path = self.write(RULES + "snif_timeout = 1.0\non_timout = None\n")
        code, out, err = self.run_main("check", path)
        self.assertEqual(code, 1)
        self.assertIn("did you mean 'sniff_timeout'?", err)
        self.assertIn("did you mean 'on_timeout'?", err)
        self.assertIn(f"{path}:{RULES.count(chr(10)) + 1}: 'snif_timeout'", err)

    def test_per_request_access_control_warns(self) -> None:
        """A Reject or a path split by a per-request field gets a warning that routing is per connection."""
        path = self.write("""\
            from twisted.internet.protocol import Factory, Protocol
            from muxtwist import Rule
            from muxtwist.actions import Reject
            from muxtwist.matchers import HTTP1
            rules = [
                Rule(HTTP1(host="admin.internal"), Reject(), name="no-admin"),
                Rule(HTTP1(path="/api/*"), Factory.forProtocol(Protocol), name="api"),
                Rule(HTTP1(host="a.test"), Factory.forProtocol(Protocol), name="a"),
            ]
        """)
        code, _, err = self.run_main("check", path)
        self.assertEqual(code, 0)
        self.assertIn("rule 'no-admin' rejects by host= of the first request only: routing is per connection", err)
        self.assertIn("rule 'api' splits by path= of the first request only", err)
        self.assertNotIn("rule 'a'", err)


class ExplainInputTests(unittest.TestCase):
    """explain takes the client's bytes as text with escapes, @file, stdin or hex."""

    def setUp(self) -> None:
        self.rules = self.mktemp() + ".py"
        with open(self.rules, "w") as f:
            f.write(RULES)

    def run_main(self, *argv: str, stdin: object = None) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(list(argv), out, err, stdin)
        return code, out.getvalue(), err.getvalue()

    def test_text_with_escapes(self) -> None:
        """'GET / HTTP/1.1\\r\\nHost: a.test\\r\\n\\r\\n' is read with its escapes, also after an option."""
        text = r"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
        for argv in (("explain", self.rules, text), ("explain", self.rules, "--final", text)):
            code, out, err = self.run_main(*argv)
            self.assertEqual(code, 0, err)
            self.assertIn("32 bytes: b'GET / HTTP/1.1\\r\\nHost: a.test\\r\\n\\r\\n'", out)
            self.assertIn("winner: site-a", out)

    def test_long_arguments_are_shown_shortened(self) -> None:
        """A long bad-escape text or --listener is shown cut to 200 characters in the one-line error."""
        for argv in (
            ("explain", self.rules, "x" * 100_000 + "\\x"),
            ("explain", self.rules, "--listener", "tcp:" + "9" * 100_000, "GET"),
        ):
            code, out, err = self.run_main(*argv)
            self.assertEqual((code, out), (1, ""))
            self.assertLessEqual(len(err), 400, err[:500])
            self.assertTrue(
                err.startswith(("muxtwist: bad escape in 'xxx", "muxtwist: no listener 'tcp:999")), err[:100]
            )

    def test_file_and_stdin(self) -> None:
        """@path reads a capture file; - reads standard input as bytes."""
        capture = self.mktemp()
        with open(capture, "wb") as f:
            f.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        code, out, _ = self.run_main("explain", self.rules, "@" + capture)
        self.assertEqual(code, 0)
        self.assertIn("winner: ssh", out)
        stdin = io.TextIOWrapper(io.BytesIO(b"SSH-2.0-x\r\n\xff"))
        code, out, _ = self.run_main("explain", self.rules, "-", stdin=stdin)
        self.assertEqual(code, 0)
        self.assertIn("12 bytes: b'SSH-2.0-x\\r\\n\\xff'", out)
        code, _, err = self.run_main("explain", self.rules, "@" + capture + ".missing")
        self.assertEqual(code, 1)
        self.assertIn("No such file", err)

    def test_one_source_only(self) -> None:
        """Bytes given twice (text and --hex) or not at all is one clear error."""
        code, _, err = self.run_main("explain", self.rules, "GET", "--hex", "00")
        self.assertEqual(code, 1)
        self.assertIn("explain wants the client's bytes once", err)
        code, _, err = self.run_main("explain", self.rules)
        self.assertEqual(code, 1)

    def test_unset_on_timeout_closes(self) -> None:
        """With on_timeout unset, a silent client is said to be closed, not sent to "on_timeout"."""
        code, out, _ = self.run_main("explain", self.rules, "--hex", "")
        self.assertEqual(code, 2)
        self.assertIn("on a timeout, the connection will be closed (on_timeout is not set)", out)
        with open(self.rules, "a") as f:
            f.write("on_timeout = Factory.forProtocol(Protocol)\n")
        code, out, _ = self.run_main("explain", self.rules, "--hex", "")
        self.assertIn("on a timeout, on_timeout -> Factory", out)


class TwistdErrorTests(unittest.TestCase):
    """Mistakes on the twistd command line are one line on stderr and a non-zero exit, not a traceback."""

    def twistd(self, *argv: str, open_files: int | None = None) -> subprocess.CompletedProcess[str]:
        """Run twistd with ``argv`` (under an ``open_files`` RLIMIT_NOFILE if given) to its end."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        env = dict(os.environ, PYTHONPATH=ROOT)

        def limit() -> None:
            if open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

        proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *argv],
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=limit,
        )
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            stop_group(proc)  # with the workers of a pool, each in a process group of its own but dying with it
            out, err = output_after_stop(proc)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        self.assertNotIn("Traceback", done.stderr + done.stdout)
        return done

    def busy_port(self) -> int:
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        port: int = listening.getsockname()[1]
        return port

    def test_port_in_use(self) -> None:
        """A port already in use names the endpoint and the reason, in the foreground and in daemon mode."""
        port = self.busy_port()
        description = f"tcp:{port}:interface=127.0.0.1"
        for mode in (["-n", "--pidfile="], ["--pidfile=twistd.pid", "--logfile=twistd.log"]):
            done = self.twistd(*mode, "muxtwist", "--port", description)
            self.assertEqual(done.returncode, 1, done.stderr)
            self.assertEqual(
                done.stderr.strip(),
                f"muxtwist: cannot listen on {description}: the address is already in use (another server listens "
                "there)",
            )

    def test_port_out_of_range(self) -> None:
        """--port 99999 is one line naming the port and the range."""
        done = self.twistd("-n", "--pidfile=", "muxtwist", "--port", "99999")
        self.assertEqual(done.returncode, 1)
        self.assertEqual(
            done.stderr.strip(), "muxtwist: --port: bad endpoint description 'tcp:99999': port 99999 is not in 0-65535"
        )

    def test_unix_socket_in_a_missing_directory(self) -> None:
        """A UNIX socket whose directory does not exist is one line naming the endpoint and the directory."""
        path = os.path.join(os.path.abspath(self.mktemp()), "missing", "mux.sock")
        for mode in (["-n", "--pidfile="], ["--pidfile=twistd.pid", "--logfile=twistd.log"]):
            done = self.twistd(*mode, "muxtwist", "--port", f"unix:{path}")
            self.assertEqual(done.returncode, 1, done.stderr)
            self.assertEqual(
                done.stderr.strip(),
                f"muxtwist: cannot listen on unix:{path}: the directory {os.path.dirname(path)} does not exist",
            )

    def test_unix_socket_held_by_another_server(self) -> None:
        """A UNIX socket whose lock another live server holds is one line saying so, not a traceback."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, "mux.sock")
        os.symlink(str(os.getpid()), path + ".lock")  # Twisted's lock file, held by this (live) process
        done = self.twistd("-n", "--pidfile=", "muxtwist", "--port", f"unix:{path}")
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertEqual(
            done.stderr.strip(),
            f"muxtwist: cannot listen on unix:{path}: another server holds its lock file {path}.lock "
            f"(process {os.getpid()})",
        )

    def test_option_errors_are_one_line_without_the_help_text(self) -> None:
        """A bad muxtwist option is one line on stderr with a pointer to --help, not twistd's whole help first."""
        for argv, problem in [
            (["--workers", "0"], "--workers must be at least 1, got 0"),
            (["--log-format", "xml"], "--log-format must be text or json, got 'xml'"),
            (["--workers", "abc"], "--workers must be a whole number, got 'abc'"),
            (["--bogus"], "option --bogus not recognized"),
        ]:
            done = self.twistd("-n", "--pidfile=", "muxtwist", *argv)
            self.assertEqual(done.returncode, 1, argv)
            self.assertEqual(done.stdout, "", argv)
            self.assertEqual(done.stderr, f"muxtwist: {problem} (see twistd muxtwist --help)\n")
        done = self.twistd("-n", "--pidfile=", "muxtwist", "--log-format", "x" * 5000)
        self.assertEqual((done.returncode, done.stdout), (1, ""))
        self.assertTrue(done.stderr.startswith("muxtwist: --log-format must be text or json, got 'xxx"), done.stderr)
        self.assertLessEqual(len(done.stderr), 300)

    def test_more_workers_than_the_open_file_limit_allows(self) -> None:
        """A --workers count whose pipes and sockets pass the open-file limit is one line saying the most that fit."""
        for count, limit in [("30", 64), ("100000", 1024)]:
            argv = ["-n", "--pidfile=", "muxtwist", "--port", "tcp:0:interface=127.0.0.1", "--workers", count]
            done = self.twistd(*argv, open_files=limit)
            self.assertEqual((done.returncode, done.stdout), (1, ""), done.stderr)
            self.assertRegex(
                done.stderr,
                rf"\Amuxtwist: --workers {count} needs about \d+ open files in this process \(4 a worker: 3 pipes,"
                rf" 1 listening socket\), more than its limit of {limit} \(ulimit -n\): give at most \d+, or raise"
                r" the limit \(see twistd muxtwist --help\)\n\Z",
            )
        most = int(done.stderr.split("give at most ")[1].split(",")[0])
        self.assertLess(most * 4, 1024)
        self.assertGreater(most * 4, 1024 - 64)

    def test_help_still_prints_every_option(self) -> None:
        """``twistd muxtwist --help`` still prints the options and exits 0."""
        done = self.twistd("muxtwist", "--help")
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        for option in ("--port=", "--config=", "--admin=", "--workers=", "--log-format="):
            self.assertIn(option, done.stdout)
        self.assertIn("[default: 1]", done.stdout)

    def test_twistd_option_after_the_plugin_name(self) -> None:
        """-n after muxtwist says it belongs before the plugin name."""
        done = self.twistd("muxtwist", "-n", "--port", "3000")
        self.assertEqual(done.returncode, 1)
        self.assertIn("-n is an option of twistd itself: put it before the plugin name", done.stderr)
        self.assertIn("twistd -n muxtwist --port 3000", done.stderr)
