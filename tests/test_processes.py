"""
Tests for the test suite's own process hygiene: tests/processes.py stops a
process with all of its children, and tests/conftest.py finds the processes
a run left behind.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

from twisted.trial import unittest

from tests.conftest import descendants
from tests.processes import stop_group
from tests.test_proxy_support import free_port, start_process


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


class _Cleanups:
    """Just enough of a TestCase for start_process: cleanups run on demand."""

    def __init__(self) -> None:
        self.cleanups: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def addCleanup(self, f: Callable[..., Any], *args: Any) -> None:
        self.cleanups.append((f, args))

    def run(self) -> None:
        for f, args in reversed(self.cleanups):
            f(*args)


class ProcessHygieneTests(unittest.TestCase):
    def test_descendants_finds_grandchildren(self) -> None:
        """The session-end check sees a grandchild (a server's worker) as well as a child."""
        proc = subprocess.Popen(
            ["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, start_new_session=True
        )
        self.addCleanup(stop_group, proc)
        assert proc.stdout is not None
        grandchild = int(proc.stdout.readline())
        found = descendants(os.getpid())
        self.assertIn(proc.pid, found)
        self.assertIn(grandchild, found)
        self.assertIn("sleep 60", found[grandchild])

    def test_stop_group_ends_children_that_outlive_their_parent(self) -> None:
        """stop_group ends the whole group, also a child that ignores SIGTERM (SIGKILL after the grace time)."""
        proc = subprocess.Popen(
            ["sh", "-c", "trap '' TERM; sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, start_new_session=True
        )
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        started = time.monotonic()
        stop_group(proc, grace=0.5)
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertIsNotNone(proc.poll())
        self.assertTrue(wait_for(lambda: child not in descendants(os.getpid())), "the child survived")

    def test_nginx_workers_stopped_with_their_master(self) -> None:
        """A server started by start_process (nginx, master and workers) leaves no process after cleanup."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        conf = os.path.join(folder, "nginx.conf")
        with open(conf, "w") as f:
            f.write(
                f"pid {folder}/nginx.pid;\nerror_log {folder}/error.log;\nworker_processes 2;\nevents {{}}\n"
                f"http {{ access_log off; client_body_temp_path {folder}/body; proxy_temp_path {folder}/proxy;"
                f" fastcgi_temp_path {folder}/fastcgi; uwsgi_temp_path {folder}/uwsgi; scgi_temp_path {folder}/scgi;"
                f" server {{ listen 127.0.0.1:{free_port()}; }} }}\n"
            )
        case = _Cleanups()
        master = start_process(case, ["nginx", "-c", conf, "-p", folder, "-g", "daemon off;"])  # type: ignore[arg-type]
        self.addCleanup(case.run)
        self.assertTrue(
            wait_for(lambda: len([p for p in descendants(os.getpid()) if p != master.pid]) >= 2), "no workers"
        )
        workers = [p for p in descendants(os.getpid()) if p != master.pid]
        case.run()
        case.cleanups.clear()
        self.assertTrue(wait_for(lambda: not set(workers) & set(descendants(os.getpid()))), "workers survived")
