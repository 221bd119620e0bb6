"""
The package as a user gets it: ``python -m build`` makes an sdist and a
wheel from the source tree, ``twine check`` accepts both, and the wheel
installed into a fresh virtual environment brings the ``twistd muxtwist``
plugin, ``python -m muxtwist`` and Twisted's HTTP/2 support with it.

Slow (about 20 s: a build and a ``pip install`` from the package index).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args: list[str], cwd: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a command to its end; its output in the failure message if it fails."""
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, start_new_session=True)
    assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def source_copy(destination: str) -> None:
    """The files git would commit now (tracked and new, not ignored), copied to ``destination``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = os.path.join(ROOT, name)
        if not os.path.isfile(source):
            continue
        target = os.path.join(destination, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target)


class PackagingTests(unittest.TestCase):
    """Build, check and install the distribution the way a release would."""

    scratch = venv = elsewhere = ""

    @classmethod
    def setUpClass(cls) -> None:
        if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
            raise unittest.SkipTest("needs a git checkout to know which files are the source")
        cls.scratch = tempfile.mkdtemp(prefix="muxtwist-packaging-")
        source, dist, cls.venv, cls.elsewhere = (os.path.join(cls.scratch, n) for n in ("src", "dist", "venv", "else"))
        os.makedirs(cls.elsewhere)
        source_copy(source)

        run([sys.executable, "-m", "build", "--outdir", dist, source], cwd=cls.scratch)
        (cls.sdist,) = glob.glob(os.path.join(dist, "muxtwist-*.tar.gz"))
        (cls.wheel,) = glob.glob(os.path.join(dist, "muxtwist-*-py3-none-any.whl"))
        run([sys.executable, "-m", "venv", cls.venv], cwd=cls.scratch)
        python = os.path.join(cls.venv, "bin", "python")
        run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", cls.wheel], cwd=cls.elsewhere)

    @classmethod
    def tearDownClass(cls) -> None:
        if cls.scratch:
            shutil.rmtree(cls.scratch, ignore_errors=True)

    def test_wheel_installs_the_twistd_plugin(self) -> None:
        """The built wheel, installed alone in a fresh venv, provides twistd muxtwist with our options."""
        checked = run([sys.executable, "-m", "twine", "check", "--strict", self.sdist, self.wheel], cwd=self.scratch)
        self.assertEqual(checked.stdout.count("PASSED"), 2, checked.stdout)
        venv, elsewhere = self.venv, self.elsewhere
        python = os.path.join(venv, "bin", "python")

        # From a directory outside the checkout, so nothing can come from it.
        where = run([python, "-c", "import muxtwist; print(muxtwist.__file__)"], cwd=elsewhere).stdout
        self.assertTrue(where.startswith(venv), where)
        helped = run([os.path.join(venv, "bin", "twistd"), "muxtwist", "--help"], cwd=elsewhere).stdout
        self.assertIn("Usage: twistd [options] muxtwist", helped)
        for option in ("--port=", "--config=", "--workers=", "--log-format="):
            self.assertIn(option, helped)
        h2 = run([python, "-c", "from twisted.web.http import H2_ENABLED; print(H2_ENABLED)"], cwd=elsewhere)
        self.assertEqual(h2.stdout.strip(), "True", "Twisted[http2] not installed with the wheel")
        rules = os.path.join(elsewhere, "rules.py")
        with open(rules, "w") as f:
            f.write(
                "from muxtwist import Rule\nfrom muxtwist.matchers import Any\nfrom muxtwist.actions import Reject\n"
            )
            f.write("rules = [Rule(Any(), Reject(), name='all')]\n")
        checked_rules = run([python, "-m", "muxtwist", "check", rules], cwd=elsewhere).stdout
        self.assertIn("OK", checked_rules)

    def test_bare_twistd_holds_sighup_before_importing_twisted(self) -> None:
        """
        Installed from the wheel, a bare ``twistd muxtwist`` (no nohup) holds
        SIGHUP from before its first Twisted import; SIGHUPs every 10 ms from
        that moment to serving kill nothing and become a reload.
        """
        from tests.processes import stop_group
        from tests.test_tap import echo_once, ignores_or_catches_sighup, listening
        from tests.twistd import free_port

        port = free_port()
        imports = os.path.join(self.scratch, "importtime.txt")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PYTHONPROFILEIMPORTTIME"] = "1"
        twistd = os.path.join(self.venv, "bin", "twistd")
        with open(imports, "wb") as stderr:
            proc = subprocess.Popen(
                [twistd, "-n", "--pidfile=", "muxtwist", "--port", str(port)],
                cwd=self.elsewhere,
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
            )
        self.addCleanup(stop_group, proc)
        started = time.monotonic()
        while time.monotonic() - started < 20 and proc.poll() is None and not ignores_or_catches_sighup(proc.pid):
            time.sleep(0.0005)
        held_after = time.monotonic() - started
        sent = 0
        while time.monotonic() - started < 60 and proc.poll() is None and not listening(port):
            proc.send_signal(signal.SIGHUP)
            sent += 1
            time.sleep(0.01)
        self.assertIsNone(proc.poll(), f"killed by one of {sent} SIGHUPs sent from {held_after:.3f} s after spawn")
        self.assertGreater(sent, 5)
        self.assertEqual(echo_once(port), b"ECHO ok\n")
        stop_group(proc)
        out, _ = proc.communicate(timeout=30)
        self.assertIn(b"reload", out)
        with open(imports, encoding="utf-8", errors="replace") as f:
            modules = [line.rsplit("|", 1)[-1].strip() for line in f if line.startswith("import time:")]
        first_twisted = next(i for i, name in enumerate(modules) if name.split(".")[0] == "twisted")
        self.assertIn("_muxtwist_startup", modules[:first_twisted])

    def twistd_under_sighups(self, port: int, then: int | None = None) -> tuple[int, bytes, int]:
        """
        Installed from the wheel, ``twistd -n muxtwist`` on ``port``, sent a SIGHUP
        every millisecond from the moment it holds them until it ends (after
        ``then`` once it listens, when given); its exit status, output and the
        SIGHUPs sent. ``then`` is sent once the process serves and has its
        handler for it (before, it would be the signal's default action).
        """
        from tests.processes import stop_group
        from tests.test_tap import ignores_or_catches_sighup, listening

        def catches(pid: int, signum: int) -> bool:
            with open(f"/proc/{pid}/status") as f:
                caught = next(line.split(":", 1)[1] for line in f if line.startswith("SigCgt:"))
            return bool(int(caught, 16) & (1 << (signum - 1)))

        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        twistd = os.path.join(self.venv, "bin", "twistd")
        proc = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "muxtwist", "--port", f"tcp:{port}:interface=127.0.0.1"],
            cwd=self.elsewhere,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.addCleanup(stop_group, proc)
        started = time.monotonic()
        while time.monotonic() - started < 20 and proc.poll() is None and not ignores_or_catches_sighup(proc.pid):
            time.sleep(0.0005)
        sent = 0
        while time.monotonic() - started < 60 and proc.poll() is None:
            if then is not None and listening(port) and catches(proc.pid, then):
                proc.send_signal(then)
                then = None
            proc.send_signal(signal.SIGHUP)
            sent += 1
            time.sleep(0.001)
        out, _ = proc.communicate(timeout=30)
        return proc.returncode, out, sent

    def test_sighups_through_a_failed_start_keep_its_exit_status(self) -> None:
        """
        Installed from the wheel, twistd muxtwist that cannot listen under a
        SIGHUP storm exits 1 with its usual message, not by the signal.
        """
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, out, sent = self.twistd_under_sighups(port)
        self.assertGreater(sent, 5)
        self.assertEqual(status, 1, out)
        self.assertIn(f"muxtwist: cannot listen on tcp:{port}:interface=127.0.0.1".encode(), out)

    def test_sighups_through_a_stop_keep_its_exit_status(self) -> None:
        """Installed from the wheel, twistd muxtwist stopped by SIGTERM under a SIGHUP storm exits 0."""
        from tests.twistd import free_port

        status, out, sent = self.twistd_under_sighups(free_port(), then=signal.SIGTERM)
        self.assertGreater(sent, 5)
        self.assertIn(b"Server Shut Down", out)
        self.assertEqual(status, 0, out[-2000:])


class SetupCfgTests(unittest.TestCase):
    """setup.cfg configures codespell, which .ci/run runs over the tree."""

    def codespell(self, cwd: str) -> subprocess.CompletedProcess[str]:
        if shutil.which("codespell") is None:
            raise unittest.SkipTest("codespell is not installed (pip install -e '.[test]')")
        return subprocess.run(["codespell"], cwd=cwd, capture_output=True, text=True, timeout=120)

    def test_codespell_reads_setup_cfg(self) -> None:
        """codespell takes its word list from setup.cfg: a real typo is caught, a listed protocol term is not."""
        scratch = os.path.abspath(self.mktemp())
        os.makedirs(scratch)
        shutil.copy(os.path.join(ROOT, "setup.cfg"), scratch)
        typo = "rec" + "ieve"  # spelled apart so that this file stays clean
        with open(os.path.join(scratch, "sample.py"), "w") as f:
            f.write(f'HEADERS = [b"te", b"trailers"]  # we {typo} these\n')
        done = self.codespell(scratch)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn(f"{typo} ==> receive", done.stdout)
        self.assertNotIn(" te ", done.stdout)

    def test_tree_is_spelled_right(self) -> None:
        """The code, tests and docs have no misspellings codespell knows."""
        done = self.codespell(ROOT)
        self.assertEqual(done.returncode, 0, done.stdout)


_LEAKY_TESTS = """
import os
import subprocess
import time

from twisted.trial import unittest


class Leaky(unittest.TestCase):
    def test_orphan(self) -> None:
        # The shell exits at once; its background child is re-parented away from the test run.
        subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $! > orphan.pid"], check=True)
        os.rename("orphan.pid", os.environ["LEAK_DIR"] + "/orphan.pid")

    def test_daemon(self) -> None:
        # A daemon: a new session, its parent gone.
        subprocess.run(
            ["sh", "-c", "setsid sh -c 'echo $$ > daemon.pid; exec sleep 60' >/dev/null 2>&1 &"], check=True
        )
        for _ in range(200):
            if os.path.exists("daemon.pid") and os.path.getsize("daemon.pid"):
                break
            time.sleep(0.02)
        os.rename("daemon.pid", os.environ["LEAK_DIR"] + "/daemon.pid")
"""


class RunHygieneTests(unittest.TestCase):
    """tests/conftest.py: a test run fails when it leaves processes behind."""

    def test_run_fails_on_orphaned_and_daemonized_processes(self) -> None:
        """A process a test started whose parent is gone (an orphan, a daemon) still fails the run, by name."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        with open(os.path.join(folder, "test_leaky.py"), "w") as f:
            f.write(_LEAKY_TESTS)
        self.addCleanup(self.kill_leaked, folder)
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q", folder],
            cwd=ROOT,
            # The leaked sleeps last 60 s: waiting the default 5 s for them to end changes nothing.
            env=dict(os.environ, LEAK_DIR=folder, MUXTWIST_TEST_LEFTOVER_GRACE="0.5"),
            capture_output=True,
            text=True,
            timeout=120,
            start_new_session=True,
        )
        self.assertNotEqual(done.returncode, 0, done.stdout)
        self.assertIn("processes started by the tests are still running", done.stdout)
        for name in ("orphan.pid", "daemon.pid"):
            with open(os.path.join(folder, name)) as f:
                pid = int(f.read())
            self.assertIn(f"{pid}: sleep 60", done.stdout)

    def kill_leaked(self, folder: str) -> None:
        for name in ("orphan.pid", "daemon.pid"):
            try:
                with open(os.path.join(folder, name)) as f:
                    os.kill(int(f.read()), 9)
            except (OSError, ValueError):
                pass


class InstallLinesTests(unittest.TestCase):
    """The install lines in the README and the docs work from a checkout while muxtwist is not on the index."""

    def test_no_install_line_asks_the_index_for_muxtwist(self) -> None:
        """No ``pip install`` line in the docs names muxtwist as a package to fetch (it is not published)."""
        import re

        paths = [os.path.join(ROOT, "README.md")]
        for folder, _, files in os.walk(os.path.join(ROOT, "docs")):
            paths += [os.path.join(folder, f) for f in files if f.endswith((".rst", ".md"))]
        wrong = []
        for path in paths:
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    command = line.strip().lstrip("$ ")
                    if not command.startswith("pip install"):
                        continue
                    arguments = re.split(r"&&|;|#|\|", command)[0].split()[2:]
                    if any(re.match(r"muxtwist(\[|[<>=~!]|$)", a.strip("'\"")) for a in arguments):
                        wrong.append(f"{os.path.relpath(path, ROOT)}:{number}: {command}")
        self.assertEqual(wrong, [])
