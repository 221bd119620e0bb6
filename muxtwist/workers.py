"""
``--workers N``: one parent process that makes the listening sockets once and
N worker processes, each with its own reactor, that adopt them
(``adoptStreamPort``) and serve. The kernel hands each new connection to one
of the workers waiting in ``accept``.

The parent forwards SIGHUP to every worker (each reloads its rules), turns
SIGTERM/SIGINT into a stop that sends SIGTERM to every worker and waits for
them to drain, and starts a new worker when one dies.

Each worker runs in a process group of its own, so a Ctrl-C in the terminal
(a signal to the parent's process group) reaches the parent only, and the
workers get one SIGTERM, from the parent. A worker that is already draining
ignores further SIGTERM/SIGINT (systemd's default ``KillMode=control-group``
signals every process of the unit): only the parent decides to cut the
drain short, on a second signal of its own, by killing the workers.

Every worker also serves its own numbers on a private UNIX socket,
``worker-N.sock`` in a directory only this user can read (named to the
workers by ``MUXTWIST_WORKERS_DIR``); the parent's ``--admin`` endpoint, and
any :func:`~muxtwist.admin.admin_site` in a worker, ask every worker there and
answer with the sum.
"""

from __future__ import annotations

import atexit
import errno
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from twisted.application.service import Service
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from muxtwist._options import shown
from muxtwist._signals import SignalHandlers
from muxtwist._twisted import default_reactor, endpoint_backlog, endpoint_port
from muxtwist._worker import _Worker
from muxtwist._worker_log import TO_PARENT_ENV
from muxtwist.admin import WORKERS_DIR_ENV, WorkerPeers, admin_site

__all__ = ["WorkerPool", "worker_command"]

log = Logger()

#: Seconds before a dead worker is started again (doubling, up to RESTART_MAX,
#: while workers keep dying young).
RESTART_DELAY = 0.5
RESTART_MAX = 30.0
#: A worker that lived this long resets the back-off.
HEALTHY_AFTER = 10.0


def worker_command(
    args: Sequence[str], twistd_args: Sequence[str] = (), *, own_group: bool = False, relayed_log: bool = False
) -> list[str]:
    """
    The command line of one worker: ``twistd -n --pidfile= [twistd_args] muxtwist ARGS``.

    :param own_group: start by moving into a process group of its own (the
        parent tries too, once the spawn returns; by then the worker has
        usually done it itself), and, on Linux, ask for a SIGTERM when the
        parent dies, since a signal to the parent's group no longer reaches
        the worker.
    :param relayed_log: the worker logs to its standard output, which the
        parent writes to its own log file and rotates: the worker catches
        ``SIGUSR1`` (twistd's "rotate the log"), which would otherwise end it,
        and does nothing with it.
    """
    group = ""
    if relayed_log:
        # Blocked by the parent from the fork on; caught, then unblocked (a
        # SIGUSR1 that came meanwhile is dropped). Caught rather than
        # ignored: programs the worker starts (a backend a rules file runs)
        # get SIGUSR1 as it comes, not ignored (nginx reopens its logs on it).
        group += (
            "import signal; signal.signal(signal.SIGUSR1, lambda signum, frame: None)\n"
            "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})\n"
        )
    if own_group:
        group += (
            "import os, signal; os.setpgid(0, 0)\n"
            "try:\n"
            "    import ctypes; ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
            "except (OSError, AttributeError): pass\n"
            f"if os.getppid() != {os.getpid()}: raise SystemExit('muxtwist worker: the parent is gone')\n"
            # A parent killed outright cannot remove the sockets' directory:
            # the last of its workers to exit does (each removes its own
            # socket first; rmdir only takes an empty directory).
            "import atexit\n"
            f"def _rmdir(d=os.environ.get({WORKERS_DIR_ENV!r})):\n"
            f"    if d and os.getppid() != {os.getpid()}:\n"
            "        try: os.rmdir(d)\n"
            "        except OSError: pass\n"
            "atexit.register(_rmdir)\n"
        )
    return [
        sys.executable,
        "-c",
        group + "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        *twistd_args,
        "muxtwist",
        *args,
    ]


class WorkerPool(SignalHandlers, Service):
    """
    Make the listening sockets of ``descriptions`` and run ``count`` workers
    that adopt them.

    :param worker_args: the ``muxtwist`` options for each worker (without
        ``--workers``); ``--inherit DESCRIPTION=FD`` options are added.
    :param twistd_args: ``twistd`` options for each worker (``--logfile``).
    :param relay_log: have each worker log to its standard output, a pipe
        this process reads, and write the workers' lines, whole, to this
        process's text log (:func:`muxtwist._textlog.write_log_lines`): one
        file, written and rotated by one process. What a worker writes to
        its standard error is logged by this process too. Otherwise the
        workers write where ``twistd_args`` say, on this process's standard
        output by default, and share its standard error.
    :param stop_timeout: seconds to wait for workers to drain after SIGTERM
        before they are killed.
    :param admin: an endpoint description where the parent serves the
        admin site (stats page, ``/status.json``, ``/metrics``, ``/ready``)
        with the numbers of every worker summed.
    :param uid: the user (and ``gid`` the group) that ``twistd --uid``
        switches to after :meth:`privilegedStartService`, the one the workers
        run as: the workers' sockets' directory, made before the switch, is
        given to them.
    :param start_failed: called with one line saying why, when the pool
        cannot start and ends the process (``SystemExit``); ``twistd``
        passes one that tells the terminal of a daemon
        (:func:`muxtwist._twisted.tell_twistd_parent`), which would
        otherwise show nothing and not return.
    :param reuse_port: give each worker a listening socket of its own for
        every ``tcp:``/``tcp6:`` listener, all bound to the same address with
        ``SO_REUSEPORT`` (Linux), so that the kernel spreads new connections
        evenly over the workers; the parent keeps each socket, so a worker
        started again in a slot takes over that slot's waiting connections.
        ``False``, and other listeners (UNIX, systemd): one socket every
        worker accepts from, where the worker that wakes first takes the
        connection.
    """

    def __init__(
        self,
        count: int,
        descriptions: Sequence[str],
        worker_args: Sequence[str],
        *,
        twistd_args: Sequence[str] = (),
        relay_log: bool = False,
        stop_timeout: float = 35.0,
        handle_signals: bool = True,
        admin: str | None = None,
        reuse_port: bool = True,
        uid: int | None = None,
        gid: int | None = None,
        start_failed: Callable[[str], object] | None = None,
        reactor: Any = None,
    ) -> None:
        reactor = default_reactor(reactor)
        if count < 1:
            raise ValueError(f"workers must be at least 1, got {shown(count)}")
        for d in descriptions:
            if d.startswith(("ssl:", "tls:", "le:", "lets:")):
                raise ValueError(f"--workers cannot share {shown(d)}: use a plain tcp: listener and TerminateTLS rules")
        self._reactor = reactor
        self.count = count
        self.descriptions = list(descriptions)
        self.worker_args = list(worker_args)
        self.twistd_args = list(twistd_args)
        self.relay_log = relay_log
        self.stop_timeout = stop_timeout
        self.handle_signals = handle_signals
        self.workers: dict[int, _Worker] = {}
        self.ports: dict[str, Any] = {}
        self.reuse_port = reuse_port and hasattr(socket, "SO_REUSEPORT") and sys.platform.startswith("linux")
        #: For ``reuse_port`` listeners: each slot's own listening socket, by description.
        self.slot_sockets: dict[str, list[socket.socket]] = {}
        self._stopping = False
        #: Whether startService is starting the workers (a spawn that fails then ends the start).
        self._starting = False
        self._delay = RESTART_DELAY
        self._pending: dict[int, Any] = {}
        self._old_handlers: dict[int, Any] = {}
        self.admin = admin
        self.admin_port: Any = None
        #: The private directory of the workers' admin sockets.
        self.directory: str | None = None
        self.uid, self.gid = uid, gid
        self.start_failed = start_failed

    @property
    def draining(self) -> bool:
        """Whether a stop has begun (``/ready`` answers 503 from then on)."""
        return self._stopping

    @property
    def pids(self) -> list[int]:
        """The process ids of the workers running now."""
        return [w.pid for w in self.workers.values() if w.pid is not None]

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        made = self.directory is None
        if self.directory is None:
            self.directory = _socket_directory(self.count)
            # twistd may fail before the reactor runs, so before any stop
            # (switching to a --uid with no passwd entry): it goes at exit then.
            atexit.register(self._remove_directory)
        try:
            if made and (self.uid is not None or self.gid is not None):
                # Made as root before twistd switches user: the workers, and
                # this process once switched, bind, reach and remove the
                # sockets there, and remove the directory at stop.
                try:
                    os.chown(self.directory, -1 if self.uid is None else self.uid, -1 if self.gid is None else self.gid)
                except PermissionError as e:
                    problem = (
                        f"cannot give the workers' sockets' directory {self.directory} to"
                        f" uid {self.uid}, gid {self.gid}: {e.strerror} (twistd --uid/--gid needs root)"
                    )
                    self._tell_start_failed(problem)
                    raise SystemExit(f"muxtwist: {problem}") from None
            self._listen()
        except BaseException as e:
            # A pool that cannot start leaves no directory behind, nor any port open.
            if made:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None
            self._close_listeners()
            error = e.socketError if isinstance(e, CannotListenError) else e
            if isinstance(error, OSError) and error.errno in _OUT_OF_DESCRIPTORS:
                log.error(
                    "cannot start {count} workers: their listening sockets need more descriptors: {problem}",
                    count=self.count,
                    problem=_cause(error),
                )
                self._tell_start_failed(f"cannot start {self.count} workers: {_cause(error)}")
                raise SystemExit(1) from None
            raise

    def _tell_start_failed(self, problem: str) -> None:
        """Say ``problem`` to :attr:`start_failed` (a daemon's waiting parent), if any; what it raises is logged."""
        if self.start_failed is None:
            return
        try:
            self.start_failed(problem)
        except Exception:
            log.failure("cannot say why the workers did not start")

    def _close_listeners(self) -> None:
        """Close the listening sockets made for the workers, and the admin site's."""
        ports = [*self.ports.values(), *([self.admin_port] if self.admin_port is not None else [])]
        self.ports, self.admin_port = {}, None
        for port in ports:
            port.stopListening()
        for sockets in self.slot_sockets.values():
            for s in sockets:
                s.close()
        self.slot_sockets = {}

    def _listen(self) -> None:
        assert self.directory is not None
        if self.admin is not None and self.admin_port is None:
            peers = WorkerPeers(self.directory, self._reactor, expected=lambda: self.count)
            site = admin_site(self, peers=peers, reactor=self._reactor)
            self.admin_port = _result(endpoints.serverFromString(self._reactor, self.admin).listen(site))
            log.info("admin site on {description} for every worker", description=self.admin)
        # Listening through the endpoint gives every kind of description
        # (tcp, tcp6, unix, systemd) for free; the parent then never reads:
        # only the workers accept.
        for description in self.descriptions:
            endpoint = endpoints.serverFromString(self._reactor, description)
            sockets = _reuse_port_sockets(endpoint, self.count) if self.reuse_port else None
            if sockets is not None:
                self.slot_sockets[description] = sockets
                log.info(
                    "listening on {description} at {address} for the workers, a socket each (SO_REUSEPORT)",
                    description=description,
                    address=sockets[0].getsockname(),
                )
                continue
            d = endpoint.listen(Factory.forProtocol(Protocol))
            port = _result(d)
            port.stopReading()
            self.ports[description] = port
            log.info(
                "listening on {description} at {address} for the workers",
                description=description,
                address=port.getHost(),
            )

    def startService(self) -> None:
        if not self.ports and not self.slot_sockets:
            self.privilegedStartService()
        super().startService()  # type: ignore[no-untyped-call]
        self._stopping = False
        self._starting = True
        try:
            for slot in range(self.count):
                self._spawn(slot)
        except OSError as e:
            self._give_up(slot, e)
        finally:
            self._starting = False
        if self.handle_signals:
            self.arm_signals()

    def _spawn(self, slot: int) -> None:
        """
        Start the worker of ``slot``. One that cannot be started is tried
        again later, but at the pool's start, where the ``OSError`` is raised.
        """
        self._pending.pop(slot, None)
        if self._stopping or not self.running:
            return
        # With the log relayed, standard error is read too: in a daemon it
        # would be /dev/null, and a worker that fails to start says why there.
        child_fds: dict[int, object] = {0: "w", 1: "r", 2: "r"} if self.relay_log else {0: "w", 1: 1, 2: 2}
        args = list(self.worker_args)
        fds = [(d, port.fileno()) for d, port in self.ports.items()]
        fds += [(d, sockets[slot].fileno()) for d, sockets in self.slot_sockets.items()]
        for i, (description, fd) in enumerate(fds):
            child_fds[3 + i] = fd
            args += ["--inherit", f"{3 + i}={description}"]
        assert self.directory is not None
        sock = os.path.join(self.directory, f"worker-{slot}.sock")
        if os.path.exists(sock):
            os.unlink(sock)  # left by a worker that died
        args += ["--admin", "unix:" + endpoints.quoteStringArgument(sock)]
        worker = _Worker(self, slot)
        self.workers[slot] = worker
        env = dict(os.environ, MUXTWIST_WORKER=str(slot))
        env[WORKERS_DIR_ENV] = self.directory
        if self.relay_log:
            env[TO_PARENT_ENV] = "1"
        # The worker starts with SIGHUP blocked (the mask survives exec) and
        # unblocks it once a SIGHUP can no longer kill it (hold_sighup), so a
        # reload forwarded while it starts waits instead of killing it.
        # SIGUSR1 (rotate the log) too, for a worker that ignores it once started.
        blocked = {signal.SIGHUP, signal.SIGUSR1} if self.relay_log else {signal.SIGHUP}
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            process = self._reactor.spawnProcess(
                worker,
                sys.executable,
                worker_command(args, self.twistd_args, own_group=True, relayed_log=self.relay_log),
                env=env,
                childFDs=child_fds,
            )
        except OSError as e:
            if self._starting:
                del self.workers[slot]
                raise
            # Out of descriptors or processes, say: tried again as for a worker that ended at once.
            log.error("cannot start worker {slot}: {problem}", slot=slot, problem=e.strerror or str(e))
            self._ended(worker)
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        pid = getattr(process, "pid", None)
        if pid is not None:
            try:
                os.setpgid(pid, pid)
            except OSError:
                pass  # the worker did it first (then it may have exec'd: EACCES), or it is gone already

    def _give_up(self, slot: int, error: OSError) -> NoReturn:
        """
        A worker could not be started with the pool (out of descriptors or
        processes): one line saying so, the workers already started stopped,
        the listening sockets closed, and ``SystemExit(1)``, which twistd
        lets through without a traceback. A pool that starts with fewer
        workers than asked, retrying the rest for ever, would leave their
        ``SO_REUSEPORT`` sockets taking connections nobody accepts.
        """
        started = [w for w in self.workers.values() if w.pid is not None]
        log.error(
            "cannot start {count} workers: worker {slot} could not be started: {problem};"
            " stopping the {started} started and exiting",
            count=self.count,
            slot=slot,
            problem=_cause(error),
            started=len(started),
        )
        self._stopping = True
        _stop_now([w.pid for w in started if w.pid is not None], min(self.stop_timeout, _GIVE_UP_WAIT))
        self.workers = {}
        self._close_listeners()
        self._remove_directory()
        atexit.unregister(self._remove_directory)
        Service.stopService(self)
        self._tell_start_failed(f"cannot start {self.count} workers: {_cause(error)}")
        raise SystemExit(1)

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

    def stop_now(self) -> None:
        """A second SIGTERM/SIGINT while draining: kill the workers, aborting their connections."""
        for w in list(self.workers.values()):
            if w.pid is not None and not w.exited:
                try:
                    os.kill(w.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def reload(self) -> None:
        """Tell every worker to reload its rules file (not once the pool is stopping)."""
        if self._stopping:
            # The workers are draining: their rules no longer matter, and one
            # that has finished draining has given up its handlers, so a
            # SIGHUP would kill it as it exits.
            log.info("reload asked while stopping: ignored")
            return
        log.info("reload: signalling {n} worker(s)", n=len(self.workers))
        self.signal_workers(signal.SIGHUP)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        # Our handlers stay in while the workers drain: a second signal kills them.
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending = {}
        for port in self.ports.values():
            port.stopListening()
        self.ports = {}
        for sockets in self.slot_sockets.values():
            for s in sockets:
                s.close()
        self.slot_sockets = {}
        running = list(self.workers.values())
        self.signal_workers(signal.SIGTERM)
        kill = self._reactor.callLater(self.stop_timeout, self._kill, running)
        done = defer.gatherResults([w.ended for w in running])

        def finished(_: object) -> defer.Deferred[None] | None:
            if kill.active():
                kill.cancel()
            self.restore_signals()
            self._remove_directory()
            atexit.unregister(self._remove_directory)
            port, self.admin_port = self.admin_port, None
            if port is not None:
                # The admin site answers (503 on /ready) until the workers are gone.
                return defer.maybeDeferred(port.stopListening)
            return None

        return done.addCallback(finished)

    def _remove_directory(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def _kill(self, workers: list[_Worker]) -> None:
        for w in workers:
            if w.pid is not None and not w.exited:
                log.warn("worker {slot} (pid {pid}) did not stop in time: killing it", slot=w.slot, pid=w.pid)
                try:
                    os.kill(w.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


#: The errors of a process out of descriptors: its own (ulimit -n) or the system's.
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})

#: Seconds a pool that could not start waits for the workers it started to exit after SIGTERM.
_GIVE_UP_WAIT = 10.0


def _cause(error: OSError) -> str:
    """What ``error`` says, and the limit it ran into where that is known."""
    problem = error.strerror or str(error)
    try:
        import resource
    except ImportError:
        return problem
    if error.errno == errno.EMFILE:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY:
            problem += f" (this process may open {soft} files: ulimit -n)"
    elif error.errno == errno.EAGAIN:
        soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
        problem += " (too many processes" + (f": ulimit -u is {soft})" if soft != resource.RLIM_INFINITY else ")")
    return problem


def _stop_now(pids: Sequence[int], timeout: float) -> None:
    """
    SIGTERM to each of ``pids`` (children of this process), a wait of at most
    ``timeout`` seconds for them to exit, then SIGKILL for any left; each is reaped.
    The reactor may not be running yet: the wait is here, bounded.
    """
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    left = set(pids)
    deadline = time.monotonic() + timeout
    while left:
        for pid in list(left):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid  # reaped already (the reactor's SIGCHLD handler)
            if done:
                left.discard(pid)
        if not left:
            break
        if time.monotonic() >= deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
            break
        time.sleep(0.02)


def _reuse_port_sockets(endpoint: object, count: int) -> list[socket.socket] | None:
    """
    ``count`` listening sockets on the address of a TCP server endpoint,
    each bound with ``SO_REUSEPORT``; ``None`` for other endpoints.

    :raises CannotListenError: the address cannot be bound.
    """
    if type(endpoint) not in (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint):
        return None
    found, backlog = endpoint_port(endpoint), endpoint_backlog(endpoint)  # type: ignore[arg-type]
    if found is None or backlog is None:
        return None
    port, interface = found
    family = socket.AF_INET6 if isinstance(endpoint, endpoints.TCP6ServerEndpoint) else socket.AF_INET
    host = interface or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    sockets: list[socket.socket] = []
    try:
        address = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)[0][4]
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(address)
            # Port 0: every socket on the port the first one got.
            address = (address[0], s.getsockname()[1], *address[2:])
            s.listen(backlog)
            s.setblocking(False)
    except (OSError, socket.gaierror) as e:
        for s in sockets:
            s.close()
        raise CannotListenError(host, port, e) from e
    return sockets


#: The longest path a UNIX socket can bind to on Linux (``sun_path`` less its NUL).
UNIX_PATH_MAX = 107


def _socket_directory(count: int) -> str:
    """
    A new directory, mode 0700 (this user only), for the workers' admin
    sockets: in ``TMPDIR``, unless ``worker-N.sock`` would not fit in a UNIX
    socket's path there (every worker would then die at start), then in ``/tmp``.
    """
    longest = f"worker-{count - 1}.sock"
    for base in (None, "/tmp"):
        directory = tempfile.mkdtemp(prefix="muxtwist-workers-", dir=base)
        if len(os.fsencode(os.path.join(directory, longest))) <= UNIX_PATH_MAX:
            return directory
        os.rmdir(directory)
    raise ValueError(f"no directory for the workers' sockets: {directory!r} is too long for a UNIX socket")


def _result(d: defer.Deferred[Any]) -> Any:
    """The result of a Deferred that has already fired (server endpoints listen synchronously)."""
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise RuntimeError("the endpoint did not start listening at once")
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]
