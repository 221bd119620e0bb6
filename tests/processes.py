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

__all__ = ["group_alive", "stop_group"]


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
