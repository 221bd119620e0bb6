"""
Stopping the processes tests start, with everything they started in turn.

Every process a test starts gets ``start_new_session=True`` (its own process
group) and is stopped with :func:`stop_group`: SIGTERM to the whole group,
SIGKILL to whatever is left after a bounded wait. Killing only the process
itself leaves its children running (nginx's workers outlive a SIGKILLed
master, still listening).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

__all__ = ["group_alive", "output_after_stop", "stop_group"]


def group_alive(pgid: int) -> bool:
    """Whether any process is left in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(process: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """
    Stop ``process`` (started with ``start_new_session=True``) and its whole
    process group: SIGTERM, then SIGKILL after ``grace`` seconds for anything
    still there; ``process`` is reaped.
    """
    pgid = process.pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not group_alive(pgid):
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            process.poll()  # reap the leader so that it does not count as alive
            if not group_alive(pgid):
                break
            time.sleep(0.02)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        pass


def output_after_stop(process: subprocess.Popen[Any], timeout: float = 30.0) -> tuple[Any, Any]:
    """
    ``process.communicate()`` for a process :func:`stop_group` has stopped,
    waiting at most ``timeout`` seconds for its pipes to close. A process
    outside its group may still hold them open (a worker of a pool runs in a
    process group of its own): an AssertionError saying so, with the pipes
    closed, instead of a wait for ever.
    """
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
        raise AssertionError(
            f"{process.args!r} was stopped, but its output is still held open after {timeout} s"
            " (by a process outside its process group)"
        ) from None
