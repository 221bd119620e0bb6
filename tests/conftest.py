"""
Session-wide test hygiene, for every test run by pytest:

- the run works in a scratch directory (trial's ``self.mktemp()`` and
  ``_trial_temp`` are relative to the working directory), so it leaves no
  ``tests.test_*`` directories in the checkout;
- under ``--reactor=asyncio`` (pytest-twisted), the ``twistd muxtwist``
  processes that tests start through tests/twistd.py run the asyncio
  reactor too;
- at the end, the run fails if any process it started is still alive (a
  child or grandchild of the pytest process, such as a twistd that ignored
  SIGTERM, or a process working in the scratch directory whose parent is
  gone: an nginx worker whose master was killed, a daemon), or if it left
  new scratch files in the checkout.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Hypothesis keeps its example database in ./.hypothesis of the directory it
# first looks from, which is the checkout (collection runs before the
# session moves to its scratch directory): keep it out of the checkout.
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), f"muxtwist-hypothesis-{os.getuid()}")
)
#: The test files that never run a reactor (no callLater, listen, connect,
#: reader or writer of their own; a Clock or memory at most): the wheel and
#: Sphinx builds, the pure matcher, parser and fuzz-harness tests, the import
#: walker, the text helpers, the deadline queue, the TCP sniffer, its model and
#: the UDP flow sniffer on a Clock or in memory, rules-file and option loading,
#: exports. Their tests are marked ``pure``: the README runs them on two
#: processes (``-m pure -n 2``, pytest-xdist) before the others, one at a time;
#: the asyncio pass of .ci/run leaves them out (they would only run twice).
PURE = frozenset(
    {
        "packaging", "docs", "matchers_properties", "matchers_basic", "matchers_edges", "matchers_options",
        "matchers_protocols", "matchers_quic", "matchers_udp", "fuzz_harnesses", "fuzz_udp", "fuzz_regressions",
        "imports", "text", "deadlines", "sniffing", "sniffing_model", "sniffing_layout", "prestage_attack",
        "testing", "connection_memory", "admin_status", "udp", "config", "options", "exports",
        "proxy_descriptions", "service_imports", "tls_matchers",
    }
)  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "pure: a test of a file that never runs a reactor (tests/conftest.py PURE)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem.removeprefix("test_") in PURE:
            item.add_marker(pytest.mark.pure)


#: Ignored paths a run may create without leaving scratch behind.
_HARMLESS = ("__pycache__", ".pyc", "dropin.cache", ".egg-info")


def descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid`` (children, grandchildren...), with its command line; from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces; the state and ppid follow it.
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] in ("Z", "X"):
            continue  # a zombie holds nothing open; its parent reaps it
        parents[int(entry)] = int(fields[1])
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                try:
                    with open(f"/proc/{child}/cmdline", "rb") as f:
                        found[child] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                except OSError:
                    found[child] = "?"
                frontier.append(child)
    return found


def working_in(directory: Path) -> dict[int, str]:
    """
    Every live process but this one whose working directory is ``directory``
    or below it, with its command line: what the tests started there, also
    once its parent is gone and it is no descendant any more (a daemon, an
    nginx worker whose master was killed, a shell's background child).
    """
    inside = str(directory)
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2 :].split()[0] in ("Z", "X"):
            continue
        if cwd == inside or cwd.startswith(inside + os.sep):
            found[int(entry)] = command
    return found


#: Overrides the 5 s that leftover_processes() grants cleanups; for
#: tests/test_packaging.py's run of a leaking test file, whose leftovers never
#: end on their own.
GRACE_ENV = "MUXTWIST_TEST_LEFTOVER_GRACE"


def leftover_processes(grace: float | None = None) -> dict[int, str]:
    """
    Processes started by this run still alive after ``grace`` seconds
    (cleanups may still be ending them; 5 s, or ``$MUXTWIST_TEST_LEFTOVER_GRACE``):
    descendants of this process, and processes working in the run's scratch
    directory whatever their parent.
    """
    if grace is None:
        grace = float(os.environ.get(GRACE_ENV, "5"))
    deadline = time.monotonic() + grace
    while True:
        left = descendants(os.getpid())
        if _scratch is not None:
            left.update(working_in(_scratch))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def scratch_entries() -> set[str]:
    """
    Ignored files and directories at the top of the checkout (where a test's
    relative paths land), but for caches any import makes.
    """
    try:
        done = subprocess.run(
            ["git", "status", "--porcelain", "--ignored", "--untracked-files=normal"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return set()
    if done.returncode != 0:
        return set()
    return {
        line[3:]
        for line in done.stdout.splitlines()
        if line.startswith("!! ") and "/" not in line[3:].rstrip("/") and not any(part in line for part in _HARMLESS)
    }


_before: set[str] = set()
#: The run's scratch directory (the working directory of the tests and of what they start).
_scratch: Path | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    _before.update(scratch_entries())
    if session.config.getoption("reactor", "default") == "asyncio":
        os.environ["MUXTWIST_TEST_TWISTD_REACTOR"] = "asyncio"  # read by tests/twistd.py


@pytest.fixture(scope="session", autouse=True)
def scratch_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Run the session in a scratch directory, so trial's mktemp() and _trial_temp land there."""
    here = os.getcwd()
    global _scratch
    scratch = tmp_path_factory.mktemp("cwd")
    _scratch = scratch.resolve()
    os.chdir(scratch)
    try:
        yield scratch
    finally:
        os.chdir(here)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    problems = []
    left = leftover_processes()
    if left:
        problems.append(
            "processes started by the tests are still running:\n"
            + "\n".join(f"  {pid}: {command}" for pid, command in sorted(left.items()))
        )
    new = sorted(scratch_entries() - _before)
    if new:
        problems.append("the run left files in the checkout:\n" + "\n".join(f"  {path}" for path in new))
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for problem in problems:
            if reporter is not None:
                reporter.write_line(f"muxtwist test hygiene: {problem}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
