"""
``--workers N``: one parent process that makes the listening sockets once and
N worker processes, each with its own reactor, that adopt them
(``adoptStreamPort``) and serve. The kernel hands each new connection to one
of the workers waiting in ``accept``.

The parent forwards SIGHUP to every worker (each reloads its rules), turns
SIGTERM/SIGINT into a stop that sends SIGTERM to every worker and waits for
them to drain, and starts a new worker when one dies.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, endpoints
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.protocol import ProcessProtocol as _ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from muxtwist._signals import SignalHandlers

__all__ = ["WorkerPool", "worker_command"]

log = Logger()

#: Seconds before a dead worker is started again (doubling, up to RESTART_MAX,
#: while workers keep dying young).
RESTART_DELAY = 0.5
RESTART_MAX = 30.0
#: A worker that lived this long resets the back-off.
HEALTHY_AFTER = 10.0


def worker_command(args: Sequence[str], twistd_args: Sequence[str] = ()) -> list[str]:
    """The command line of one worker: ``twistd -n --pidfile= [twistd_args] muxtwist ARGS``."""
    return [
        sys.executable,
        "-c",
        "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        *twistd_args,
        "muxtwist",
        *args,
    ]


class _Worker(_ProcessProtocol):
    def __init__(self, pool: WorkerPool, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.started = pool._reactor.seconds()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.pid: int | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        log.info("worker {slot} started: pid {pid}", slot=self.slot, pid=self.pid)

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        if reason.check(ProcessDone):
            log.info("worker {slot} (pid {pid}) exited", slot=self.slot, pid=self.pid)
        else:
            log.warn(
                "worker {slot} (pid {pid}) ended: exit code {code}, signal {signal}",
                slot=self.slot,
                pid=self.pid,
                code=code,
                signal=sig,
            )
        self.ended.callback(None)
        self.pool._ended(self)


class WorkerPool(SignalHandlers, Service):
    """
    Make the listening sockets of ``descriptions`` and run ``count`` workers
    that adopt them.

    :param worker_args: the ``muxtwist`` options for each worker (without
        ``--workers``); ``--inherit DESCRIPTION=FD`` options are added.
    :param twistd_args: ``twistd`` options for each worker (``--logfile``).
    :param stop_timeout: seconds to wait for workers to drain after SIGTERM
        before they are killed.
    """

    def __init__(
        self,
        count: int,
        descriptions: Sequence[str],
        worker_args: Sequence[str],
        *,
        twistd_args: Sequence[str] = (),
        stop_timeout: float = 35.0,
        handle_signals: bool = True,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        if count < 1:
            raise ValueError(f"workers must be at least 1, got {count}")
        for d in descriptions:
            if d.startswith(("ssl:", "tls:", "le:", "lets:")):
                raise ValueError(f"--workers cannot share {d!r}: use a plain tcp: listener and TerminateTLS rules")
        self._reactor = reactor
        self.count = count
        self.descriptions = list(descriptions)
        self.worker_args = list(worker_args)
        self.twistd_args = list(twistd_args)
        self.stop_timeout = stop_timeout
        self.handle_signals = handle_signals
        self.workers: dict[int, _Worker] = {}
        self.ports: dict[str, Any] = {}
        self._stopping = False
        self._delay = RESTART_DELAY
        self._pending: dict[int, Any] = {}
        self._old_handlers: dict[int, Any] = {}

    @property
    def pids(self) -> list[int]:
        """The process ids of the workers running now."""
        return [w.pid for w in self.workers.values() if w.pid is not None]

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        # Listening through the endpoint gives every kind of description
        # (tcp, tcp6, unix, systemd) for free; the parent then never reads:
        # only the workers accept.
        for description in self.descriptions:
            d = endpoints.serverFromString(self._reactor, description).listen(Factory.forProtocol(Protocol))
            port = _result(d)
            port.stopReading()
            self.ports[description] = port
            log.info(
                "listening on {description} at {address} for the workers",
                description=description,
                address=port.getHost(),
            )

    def startService(self) -> None:
        if not self.ports:
            self.privilegedStartService()
        super().startService()  # type: ignore[no-untyped-call]
        self._stopping = False
        for slot in range(self.count):
            self._spawn(slot)
        if self.handle_signals:
            self.arm_signals()

    def _spawn(self, slot: int) -> None:
        self._pending.pop(slot, None)
        if self._stopping or not self.running:
            return
        child_fds: dict[int, object] = {0: "w", 1: 1, 2: 2}
        args = list(self.worker_args)
        for i, (description, port) in enumerate(self.ports.items()):
            child_fds[3 + i] = port.fileno()
            args += ["--inherit", f"{3 + i}={description}"]
        worker = _Worker(self, slot)
        self.workers[slot] = worker
        # The worker starts with SIGHUP blocked (the mask survives exec) and
        # unblocks it once a SIGHUP can no longer kill it (hold_sighup), so a
        # reload forwarded while it starts waits instead of killing it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            self._reactor.spawnProcess(
                worker,
                sys.executable,
                worker_command(args, self.twistd_args),
                env=dict(os.environ, MUXTWIST_WORKER=str(slot)),
                childFDs=child_fds,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _ended(self, worker: _Worker) -> None:
        if self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]
        if self._stopping or not self.running:
            return
        lived = self._reactor.seconds() - worker.started
        self._delay = RESTART_DELAY if lived >= HEALTHY_AFTER else min(self._delay * 2, RESTART_MAX)
        delay = RESTART_DELAY if lived >= HEALTHY_AFTER else self._delay
        log.info("starting worker {slot} again in {delay}s", slot=worker.slot, delay=delay)
        self._pending[worker.slot] = self._reactor.callLater(delay, self._spawn, worker.slot)

    def signal_workers(self, signum: int) -> None:
        """Send ``signum`` to every running worker."""
        for pid in self.pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def reload(self) -> None:
        """Tell every worker to reload its rules file."""
        log.info("reload: signalling {n} worker(s)", n=len(self.workers))
        self.signal_workers(signal.SIGHUP)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        self.restore_signals()
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending = {}
        for port in self.ports.values():
            port.stopListening()
        self.ports = {}
        running = list(self.workers.values())
        self.signal_workers(signal.SIGTERM)
        kill = self._reactor.callLater(self.stop_timeout, self._kill, running)
        done = defer.gatherResults([w.ended for w in running])

        def finished(_: object) -> None:
            if kill.active():
                kill.cancel()

        return done.addCallback(finished)

    def _kill(self, workers: list[_Worker]) -> None:
        for w in workers:
            if w.pid is not None and not w.ended.called:
                log.warn("worker {slot} (pid {pid}) did not stop in time: killing it", slot=w.slot, pid=w.pid)
                try:
                    os.kill(w.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _result(d: defer.Deferred[Any]) -> Any:
    """The result of a Deferred that has already fired (server endpoints listen synchronously)."""
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise RuntimeError("the endpoint did not start listening at once")
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]
