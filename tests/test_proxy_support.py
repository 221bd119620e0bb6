"""
Helpers for the proxy tests: loopback listeners, recording clients and
backends, waits with deadlines, and external processes killed in cleanup.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from muxtwist import Rule, SniffingFactory
from muxtwist.proxy import _splice
from muxtwist.proxy._polled import server_transport
from tests.processes import stop_group

R: Any = reactor


def wait(d: defer.Deferred[Any], seconds: float = 10.0) -> defer.Deferred[Any]:
    """``d``, failing with a TimeoutError after ``seconds``."""
    return d.addTimeout(seconds, R)


async def until(condition: Callable[[], bool], seconds: float = 10.0, step: float = 0.01) -> None:
    """Wait, without blocking the reactor, until ``condition()`` holds; fail after ``seconds``."""
    deadline = R.seconds() + seconds
    while not condition():
        if R.seconds() > deadline:
            raise AssertionError(f"condition not met within {seconds}s")
        await task.deferLater(R, step, lambda: None)


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


@implementer(IHalfCloseableProtocol)
class Peer(protocol.Protocol):
    """A client or backend that records what it receives and when its halves close."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.made: defer.Deferred[None] = defer.Deferred()
        self.eof: defer.Deferred[None] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None
        self.on_data: Callable[[Peer], None] | None = None

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.on_data is not None:
            self.on_data(self)

    write_closed = False

    def readConnectionLost(self) -> None:
        if not self.eof.called:
            self.eof.callback(None)
        if self.write_closed and self.transport is not None:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        # Both halves shut: nothing more can happen, so close, as real programs do.
        self.write_closed = True
        if self.eof.called and self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.reason = reason
        if not self.eof.called:
            self.eof.callback(None)
        self.lost.callback(None)

    async def closed(self, seconds: float = 10.0) -> Failure:
        """Wait for the other end to close or reset; close ours after a FIN. The reason we saw."""
        await wait(self.eof, seconds)
        if not self.lost.called and self.transport is not None:
            self.transport.loseConnection()
        await wait(self.lost, seconds)
        assert self.reason is not None
        return self.reason

    async def received_at_least(self, n: int, seconds: float = 10.0) -> bytes:
        await until(lambda: len(self.received) >= n or self.lost.called, seconds)
        return bytes(self.received)


class Echo(Peer):
    """A backend that echoes every byte, and half-closes when its client does."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        assert self.transport is not None
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        super().readConnectionLost()
        assert self.transport is not None
        self.transport.loseWriteConnection()  # type: ignore[attr-defined]


class PeerFactory(protocol.Factory):
    """Builds ``kind`` protocols and keeps every one built."""

    def __init__(self, kind: Callable[[], Peer] = Peer) -> None:
        self.kind = kind
        self.built: list[Peer] = []
        self.arrived: defer.Deferred[Peer] = defer.Deferred()

    def buildProtocol(self, addr: Any) -> Peer:
        p = self.kind()
        self.built.append(p)
        if not self.arrived.called:
            self.arrived.callback(p)
        return p


def listen(case: unittest.TestCase, factory: protocol.Factory, *, interface: str = "127.0.0.1") -> int:
    """Listen on an ephemeral loopback port for the length of the test; the port number."""
    port = R.listenTCP(0, factory, interface=interface)
    case.addCleanup(port.stopListening)
    return int(port.getHost().port)


def backend(case: unittest.TestCase, kind: Callable[[], Peer] = Echo) -> tuple[str, PeerFactory]:
    """A recording backend on loopback: its endpoint description and factory."""
    factory = PeerFactory(kind)
    port = listen(case, factory)

    def close_all() -> None:
        for p in factory.built:
            if p.transport is not None and not p.lost.called:
                p.transport.abortConnection()  # type: ignore[attr-defined]

    case.addCleanup(close_all)
    return f"tcp:host=127.0.0.1:port={port}", factory


def mux(case: unittest.TestCase, rules: Sequence[Rule], **options: Any) -> tuple[int, SniffingFactory]:
    """
    A SniffingFactory listening on loopback for the length of the test; for a
    case whose ``polled`` is true, with the port's transports chosen as a
    Listener chooses them (:mod:`muxtwist.proxy._polled`).
    """
    factory = SniffingFactory(rules, **options)
    port = R.listenTCP(0, factory, interface="127.0.0.1")
    if getattr(case, "polled", False) and _splice.AVAILABLE:
        # As a Listener (twistd muxtwist, MuxService) sets its TCP ports up.
        port.transport = server_transport

    async def stop() -> None:
        await port.stopListening()
        factory.abort_all()
        await wait(factory.when_idle(), 5)

    case.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
    return int(port.getHost().port), factory


async def connect(case: unittest.TestCase, port: int, host: str = "127.0.0.1") -> Peer:
    """A recording client connected to ``port``; aborted in cleanup if still open."""
    client = Peer()
    endpoint = endpoints.TCP4ClientEndpoint(R, host, port) if ":" not in host else None
    if endpoint is None:
        endpoint = endpoints.TCP6ClientEndpoint(R, host, port)
    await wait(endpoints.connectProtocol(endpoint, client), 5)

    def close() -> None:
        if client.transport is not None and not client.lost.called:
            client.transport.abortConnection()  # type: ignore[attr-defined]

    case.addCleanup(close)
    return client


def need(tool: str) -> str:
    """The path of an installed program (a missing one is an error: CI installs them)."""
    path = shutil.which(tool) or (tool if os.path.exists(tool) else None)
    if path is None:
        raise AssertionError(f"{tool} is not installed (see .ci/apt-packages.txt)")
    return path


def tempdir(case: unittest.TestCase) -> str:
    path = tempfile.mkdtemp(prefix="muxtwist-proxy-")
    case.addCleanup(shutil.rmtree, path, True)
    return path


def start_process(case: unittest.TestCase, args: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
    """Start a server process in its own process group; in cleanup it is stopped with its children."""
    proc = subprocess.Popen(list(args), stdin=subprocess.DEVNULL, start_new_session=True, **kw)
    case.addCleanup(stop_group, proc)
    return proc


def free_port() -> int:
    """A loopback port nothing listens on right now (for servers that cannot take port 0)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def port_open(
    port: int, proc: subprocess.Popen[bytes] | None = None, seconds: float = 10.0, host: str = "127.0.0.1"
) -> None:
    """Wait until something accepts connections on ``host`` (loopback) ``port``."""
    deadline = R.seconds() + seconds
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            p = await endpoints.connectProtocol(
                endpoints.TCP4ClientEndpoint(R, host, port, timeout=1), protocol.Protocol()
            )
        except Exception:
            if R.seconds() > deadline:
                raise AssertionError(f"nothing listens on port {port} after {seconds}s") from None
            await task.deferLater(R, 0.02, lambda: None)
            continue
        assert p.transport is not None
        p.transport.abortConnection()
        return


async def run(
    args: Sequence[str], seconds: float = 20.0, env: dict[str, str] | None = None
) -> tuple[bytes, bytes, int]:
    """Run a client program without blocking the reactor: (stdout, stderr, exit code)."""
    from twisted.internet.utils import getProcessOutputAndValue

    d = getProcessOutputAndValue(args[0], list(args[1:]), env=env if env is not None else dict(os.environ))
    out, err, code = await wait(d, seconds)
    return out, err, code
