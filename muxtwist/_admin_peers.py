"""
The workers of a ``--workers`` pool, asked over their private admin sockets:
``worker-N.sock`` in the directory the parent names in
``MUXTWIST_WORKERS_DIR``, trusted only when it is this user's (or root's)
and closed to everyone else.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from muxtwist._twisted import default_reactor

__all__ = ["INSTANCE_HEADER", "PEER_TIMEOUT", "WORKERS_DIR_ENV", "WorkerPeers"]

log = Logger(namespace="muxtwist.admin")

#: The environment variable a ``--workers`` parent sets for its workers:
#: the directory holding each worker's private admin socket.
WORKERS_DIR_ENV = "MUXTWIST_WORKERS_DIR"

#: Seconds the aggregating admin waits for each worker's numbers.
PEER_TIMEOUT = 2.0

#: The response header naming one worker's admin site (a new one for each worker started).
INSTANCE_HEADER = b"x-muxtwist-instance"


@implementer(IAgentEndpointFactory)
class _UNIXSockets:
    """Agent endpoints for ``http://worker-N/...``: the socket ``worker-N.sock`` in one directory."""

    def __init__(self, reactor: Any, directory: str) -> None:
        self.reactor = reactor
        self.directory = directory

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        name = uri.host.decode("ascii")
        return UNIXClientEndpoint(self.reactor, os.path.join(self.directory, f"{name}.sock"), timeout=PEER_TIMEOUT)


def _worker_slot(filename: str) -> int | None:
    """N for ``worker-N.sock``; None for any other name."""
    match = re.fullmatch(r"worker-([0-9]{1,6})\.sock", filename)
    return int(match.group(1)) if match else None


class WorkerPeers:
    """
    The workers of a ``--workers`` pool, reached through their private admin
    sockets (``worker-N.sock`` in ``directory``).
    """

    def __init__(self, directory: str, reactor: Any = None, expected: Callable[[], int] | None = None) -> None:
        reactor = default_reactor(reactor)
        self.directory = directory
        self._reactor = reactor
        self._agent = Agent.usingEndpointFactory(reactor, _UNIXSockets(reactor, directory))
        self._expected = expected
        self._warned = False

    def names(self) -> list[str]:
        """
        ``worker-N`` for each worker, in slot order: every slot of the pool
        when its size is known (a worker being restarted has no socket, and
        shows as not answering), else each ``worker-N.sock`` in the directory.
        None when the directory is not this user's (or root's) and closed to
        everyone else: whoever can write there could plant a socket and answer
        for a worker.
        """
        if not self._trusted():
            return []
        if self._expected is not None:
            return [f"worker-{slot}" for slot in range(self._expected())]
        try:
            entries = os.listdir(self.directory)
        except OSError:
            return []
        slots = [_worker_slot(e) for e in entries]
        return [f"worker-{slot}" for slot in sorted(s for s in slots if s is not None)]

    def _trusted(self) -> bool:
        try:
            info = os.stat(self.directory)
        except OSError:
            return False
        if stat.S_ISDIR(info.st_mode) and info.st_uid in (0, os.geteuid()) and not info.st_mode & 0o022:
            return True
        if not self._warned:
            self._warned = True
            log.warn(
                "admin: not asking the workers in {directory}: it must be a directory of this user's"
                " (or root's) that no one else can write to",
                directory=self.directory,
            )
        return False

    @property
    def expected(self) -> int:
        """How many workers there should be (the pool's count, or the sockets found)."""
        return self._expected() if self._expected is not None else len(self.names())

    def fetch(self, path: str) -> defer.Deferred[list[tuple[str, bytes | None]]]:
        """``GET path`` from every worker; ``None`` for a worker that did not answer in time."""

        def bodies(answers: list[tuple[str, bytes | None, str | None]]) -> list[tuple[str, bytes | None]]:
            return [(name, body) for name, body, _ in answers]

        return self.fetch_answers(path).addCallback(bodies)

    def fetch_answers(self, path: str) -> defer.Deferred[list[tuple[str, bytes | None, str | None]]]:
        """
        ``GET path`` from every worker: its name, the body (``None`` for a
        worker that did not answer in time) and which worker process it was
        (the ``X-Muxtwist-Instance`` header).
        """
        names = self.names()

        def one(name: str) -> defer.Deferred[tuple[str, bytes | None, str | None]]:
            d = self._agent.request(b"GET", f"http://{name}{path}".encode("ascii"))
            instance: list[str | None] = [None]

            def body(response: Any) -> Any:
                if response.code != 200:
                    raise ValueError(f"{name}{path} answered {response.code}")
                header = response.headers.getRawHeaders(INSTANCE_HEADER)
                instance[0] = header[0].decode("ascii", "replace") if header else None
                return readBody(response)

            d.addCallback(body)
            d.addTimeout(PEER_TIMEOUT, self._reactor)

            def answered(data: bytes) -> tuple[str, bytes | None, str | None]:
                return name, data, instance[0]

            def failed(reason: Failure) -> tuple[str, bytes | None, str | None]:
                log.warn("admin: no answer from {worker}: {problem}", worker=name, problem=reason.getErrorMessage())
                return name, None, None

            result: defer.Deferred[tuple[str, bytes | None, str | None]] = d.addCallbacks(answered, failed)
            return result

        return defer.gatherResults([one(n) for n in names])
