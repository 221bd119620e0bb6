"""
Run ``twistd -n muxtwist`` from this checkout as a child process, for tests.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time

from muxtwist.workers import worker_command
from tests.processes import output_after_stop, stop_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


#: Set by tests/conftest.py when the session runs Twisted's asyncio reactor:
#: the twistd processes the tests start then run it too.
REACTOR_ENV = "MUXTWIST_TEST_TWISTD_REACTOR"


def twistd_command(*args: str) -> list[str]:
    """
    ``twistd -n --pidfile= [--reactor=R] muxtwist ARGS``, importing muxtwist
    and its plugins from this checkout; ``R`` is the session's reactor when
    that is not the default one.
    """
    reactor = os.environ.get(REACTOR_ENV)
    return worker_command(args, [f"--reactor={reactor}"] if reactor else [])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20.0) -> None:
    """Wait until something accepts on 127.0.0.1:port (or the process dies, or time runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''!r}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


class Twistd:
    """A running ``twistd muxtwist``; ``stop()`` sends SIGTERM and returns the exit code and log."""

    def __init__(self, *args: str, wait_ports: tuple[int, ...] = (), cwd: str = ROOT) -> None:
        self.proc = subprocess.Popen(
            twistd_command(*args),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
            start_new_session=True,
        )
        #: What read_until() has read of the output; wait() returns it first.
        self._early_output = b""
        try:
            for port in wait_ports:
                wait_for_port(port, self.proc)
        except BaseException:
            self.kill()
            raise

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def read_until(self, text: bytes, timeout: float = 30.0) -> None:
        """
        Read the server's output until ``text`` is in it: a step the server
        has logged, such as having handled a signal. AssertionError, with the
        output so far, after ``timeout`` seconds or if the output ends first.
        """
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while text not in self._early_output:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} not in the output after {timeout} s: {self._early_output[-3000:]!r}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"the output ended without {text!r}: {self._early_output[-3000:]!r}")
                self._early_output += chunk

    def wait(self, timeout: float = 30.0) -> tuple[int, str]:
        """Wait for the server to exit by itself (killed with its group after ``timeout``): its status and log."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(self.proc)
            out, _ = output_after_stop(self.proc)
        return self.proc.returncode, (self._early_output + out).decode(errors="replace")

    def kill(self) -> None:
        """Stop the server and its whole process group (workers too): TERM, then KILL."""
        stop_group(self.proc)
        output_after_stop(self.proc)
