"""
How many ``--workers`` this process and this machine can run, checked when
the options are parsed, so that an absurd count is one line saying what
bounds it instead of an EMFILE traceback or a pool that keeps failing to
start its workers.

What bounds it:

- Open files. The parent holds, for as long as a worker runs, its end of
  the worker's three pipes (standard input, output and error) and, on
  Linux, one listening socket per ``tcp:``/``tcp6:`` listener
  (``SO_REUSEPORT``, a socket each); with ``--admin``, a scrape holds one
  connection to every worker's admin socket at once. That, for every
  worker, plus what is open already and :data:`RESERVE` more, must fit under
  the soft ``RLIMIT_NOFILE`` (``ulimit -n``), which the workers inherit.
- Memory. Each worker is a whole Python process with Twisted loaded,
  :data:`WORKER_MEMORY` at the very least (about 52 MB resident measured
  with the built-in rules), so a count whose floor is more than the
  machine's physical memory cannot run whatever the limits say.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from muxtwist._options import shown

__all__ = ["workers_problem"]

#: Descriptors of the parent's own beyond those open at the check: the
#: child's ends of a worker's pipes while it is spawned, the log file
#: twistd opens later, clients of the admin site.
RESERVE = 16
#: The ends of a worker's pipes the parent holds (standard input, output, error).
PIPES = 3
#: The least memory a worker takes (a Python process with Twisted and a reactor).
WORKER_MEMORY = 30 * 1024 * 1024


def _open_files() -> int | None:
    """How many descriptors this process has open now (None where that cannot be read)."""
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            # Less the one descriptor listing the directory takes.
            return len(os.listdir(listing)) - 1
        except OSError:
            continue
    return None


def _open_files_limit() -> int | None:
    """The soft RLIMIT_NOFILE (None when unlimited, or on a system without one)."""
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _memory() -> int | None:
    """This machine's physical memory in bytes (None where it cannot be read)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _per_socket(description: str) -> bool:
    """Whether a ``--workers`` pool makes a listening socket per worker for ``description`` (SO_REUSEPORT)."""
    return sys.platform.startswith("linux") and description.startswith(("tcp:", "tcp6:"))


def workers_problem(
    count: int,
    descriptions: Sequence[str],
    *,
    admin: bool,
    open_files: int | None = None,
    limit: int | None = None,
    memory: int | None = None,
) -> str | None:
    """
    Why a pool of ``count`` workers serving ``descriptions`` cannot run in
    this process on this machine, as one sentence; None if it can.

    :param admin: whether ``--admin`` is given (a scrape holds a connection to every worker).
    :param open_files: the descriptors open now (default: this process's).
    :param limit: the soft open-file limit (default: this process's ``RLIMIT_NOFILE``, not checked when unlimited).
    :param memory: the machine's physical memory in bytes (default: this machine's).
    """
    if count < 2:
        return None  # --workers 1 is the one process, no pool
    sockets = sum(1 for d in descriptions if _per_socket(d))
    shared = len(descriptions) - sockets + (1 if admin else 0)
    per_worker = PIPES + sockets + (1 if admin else 0)
    limit = _open_files_limit() if limit is None else limit
    if open_files is None:
        open_files = _open_files()
    if limit is not None:
        already = (open_files or 0) + RESERVE + shared
        needed = already + count * per_worker
        if needed > limit:
            most = max(1, (limit - already) // per_worker)
            parts = [f"{PIPES} pipes"]
            if sockets:
                parts.append(f"{sockets} listening socket{'s' if sockets > 1 else ''}")
            if admin:
                parts.append("a connection to its admin socket")
            return (
                f"--workers {shown(count)} needs about {shown(needed)} open files in this process"
                f" ({per_worker} a worker: {', '.join(parts)}), more than its limit of {limit} (ulimit -n):"
                f" give at most {most}, or raise the limit"
            )
    memory = _memory() if memory is None else memory
    if memory is not None and count * WORKER_MEMORY > memory:
        most = max(1, memory // WORKER_MEMORY)
        return (
            f"--workers {shown(count)} needs more memory than this machine has: each worker is a Python process"
            f" of at least {WORKER_MEMORY // 2**20} MB, and there are {memory // 2**20} MB in all:"
            f" give at most {most}"
        )
    return None
