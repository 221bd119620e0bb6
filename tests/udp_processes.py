"""
Real servers and clients for the UDP tests: processes started in their own
session, stopped with their children, and waited for with deadlines.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue

from tests.processes import stop_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H3 = os.path.join(ROOT, "examples", "udp", "h3.py")


def start(args: Sequence[str], cleanup: Callable[..., object], **kwargs: object) -> subprocess.Popen[bytes]:
    """Start ``args`` in a new session; ``cleanup`` registers its kill (with its children)."""
    proc = subprocess.Popen(
        list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        **kwargs,  # type: ignore[call-overload]
    )
    cleanup(stop, proc)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    stop_group(proc)
    if proc.stdout is not None:
        proc.stdout.close()


def wait_line(proc: subprocess.Popen[bytes], prefix: bytes, timeout: float = 15.0) -> bytes:
    """The first output line of ``proc`` starting with ``prefix`` (AssertionError after ``timeout``)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"no line starting with {prefix!r} within {timeout}s; output: {seen!r}")


def h3_server(directory: str, body: str, cleanup: Callable[..., object]) -> int:
    """An aioquic HTTP/3 server answering ``body`` (certificate ``site.pem`` in ``directory``); its port."""
    proc = start(
        [sys.executable, H3, "serve", "--cert", "site.pem", "--key", "site.key", "--body", body],
        cleanup,
        cwd=directory,
    )
    return int(wait_line(proc, b"listening").split()[1])


def h3_get(directory: str, url: str, port: int, extra_alpn: int = 0) -> defer.Deferred[tuple[bytes, bytes, int]]:
    """Run the aioquic HTTP/3 client against ``127.0.0.1:port`` (without blocking the reactor)."""
    args = [H3, "get", url, "--connect", f"127.0.0.1:{port}", "--ca", "ca.pem", "--extra-alpn", str(extra_alpn)]
    return getProcessOutputAndValue(sys.executable, args, path=directory, reactor=reactor)  # type: ignore[no-any-return]


def write_certificates(directory: str, *names: str) -> None:
    """A CA (``ca.pem``) and one certificate for ``names`` (``site.pem``, ``site.key``)."""
    from .certs import make_ca, make_certificate

    ca = make_ca()
    site = make_certificate(*names, ca=ca)
    for name, data in (("ca.pem", ca.cert_pem), ("site.pem", site.cert_pem), ("site.key", site.key_pem)):
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
