"""
``twistd muxtwist --workers 2`` as a real process tree: one ``/metrics``
scrape and one ``/status.json`` count the connections of every worker, and
a stop signal, however it arrives (Ctrl-C to the process group, or SIGTERM
to every process as systemd's default ``KillMode=control-group`` sends it),
drains each worker exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import time
import urllib.request
from typing import Any

from twisted.trial import unittest

from tests.test_admin_page import Process, free_port, twistd, until, wait_for_port

RULES = """\
from twisted.internet.protocol import Factory

from muxtwist import Rule
from muxtwist.admin import admin_site
from muxtwist.default import Echo
from muxtwist.matchers import HTTP1, Any

rules = [
    Rule(HTTP1(path="/metrics"), admin_site(), name="admin"),
    Rule(Any(), Factory.forProtocol(Echo), name="echo"),
]
shutdown_timeout = 15.0
"""


def get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        body: bytes = response.read()
        return body


def sample(metrics: str, line_start: str) -> float:
    """The value of the one sample whose line starts with ``line_start``."""
    (line,) = [line for line in metrics.splitlines() if line.startswith(line_start + " ")]
    return float(line.rsplit(" ", 1)[1])


class Pool:
    """A ``twistd muxtwist --workers 2 --admin`` serving ``RULES``, with every process stopped at cleanup."""

    def __init__(self, case: unittest.TestCase) -> None:
        tmp = tempfile.mkdtemp(prefix="muxtwist-test-")
        case.addCleanup(shutil.rmtree, tmp, True)
        rules = os.path.join(tmp, "rules.py")
        with open(rules, "w") as f:
            f.write(RULES)
        self.port, self.admin = free_port(), free_port()
        self.server: Process = twistd(
            tmp,
            "--config",
            rules,
            "--port",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--admin",
            f"tcp:{self.admin}:interface=127.0.0.1",
            "--workers",
            "2",
        )
        self.worker_pids: set[int] = set()
        case.addCleanup(self.kill)
        wait_for_port(self.port, self.server.proc)
        wait_for_port(self.admin, self.server.proc)
        until(lambda: len(self.children()) == 2, 30, "two workers")

    def children(self) -> set[int]:
        """The worker processes: the children of the parent, as Linux lists them."""
        pid = self.server.proc.pid
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                found = {int(p) for p in f.read().split()}
        except OSError:
            return set()
        self.worker_pids |= found
        return found

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(get(self.admin, "/status.json"))
        return data

    def answering(self) -> list[dict[str, Any]]:
        workers = [w for w in self.status()["workers"] if w.get("answered")]
        self.worker_pids.update(w["pid"] for w in workers)
        return workers

    def kill(self) -> None:
        self.server.kill()
        for pid in self.worker_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def connect_until_both_workers_hold_some(pool: Pool, limit: int = 120) -> list[socket.socket]:
    """Open echo connections, several at once, until each worker holds at least one."""
    held: list[socket.socket] = []
    deadline = time.monotonic() + 30
    while len(held) < limit and time.monotonic() < deadline:
        batch = [socket.create_connection(("127.0.0.1", pool.port), timeout=5) for _ in range(6)]
        for s in batch:
            s.sendall(b"hello\n")
        for s in batch:
            if s.recv(100) != b"hello\n":
                raise AssertionError("no echo")
        held += batch
        if all(w["live"] > 0 for w in pool.answering()):
            return held
    raise AssertionError(f"the kernel gave {len(held)} connections to one worker only")


class AggregatedMetricsTests(unittest.TestCase):
    """/metrics and /status.json under --workers answer for every worker."""

    def test_one_scrape_counts_every_workers_connections(self) -> None:
        """Connections held by two different workers all show in one /metrics scrape and one /status.json."""
        pool = Pool(self)
        until(lambda: len(pool.answering()) == 2, 30, "both workers answering the admin site")
        held = connect_until_both_workers_hold_some(pool)
        self.addCleanup(lambda: [s.close() for s in held])
        status = pool.status()
        workers = [w for w in status["workers"] if w["answered"]]
        self.assertEqual(len(workers), 2, status["workers"])
        self.assertEqual(len({w["pid"] for w in workers}), 2)
        self.assertTrue(all(w["live"] > 0 for w in workers), workers)
        (listener,) = status["listeners"]
        echo = next(r for r in listener["rules"] if r["name"] == "echo")
        self.assertEqual(echo["live"], len(held))

        metrics = get(pool.admin, "/metrics").decode()
        self.assertEqual(sample(metrics, 'muxtwist_active_connections{rule="echo"}'), len(held))
        self.assertEqual(sample(metrics, "muxtwist_workers_answered"), 2)
        self.assertEqual(sample(metrics, "muxtwist_workers"), 2)

        # An admin_site() that is a rule on the shared port sums the workers too,
        # whichever worker takes the scrape.
        for _ in range(4):
            through_rule = get(pool.port, "/metrics").decode()
            self.assertEqual(sample(through_rule, 'muxtwist_active_connections{rule="echo"}'), len(held))

        # Connections that ended in either worker are counted once each.
        for s in held:
            s.close()
        until(
            lambda: sample(get(pool.admin, "/metrics").decode(), 'muxtwist_active_connections{rule="echo"}') == 0,
            15,
            "the closed connections to end",
        )
        ended = sample(
            get(pool.admin, "/metrics").decode(), 'muxtwist_connections_total{outcome="handed_off",rule="echo"}'
        )
        self.assertEqual(ended, len(held))


class SpreadTests(unittest.TestCase):
    """New connections are spread over the workers."""

    def test_connections_spread_evenly_over_the_workers(self) -> None:
        """Of 80 connections opened one after another, each of two workers holds at least a quarter."""
        pool = Pool(self)
        until(lambda: len(pool.answering()) == 2, 30, "both workers answering the admin site")
        held: list[socket.socket] = []
        self.addCleanup(lambda: [s.close() for s in held])
        for _ in range(80):
            s = socket.create_connection(("127.0.0.1", pool.port), timeout=5)
            held.append(s)
            s.sendall(b"hello\n")
            self.assertEqual(s.recv(100), b"hello\n")
        live = [w["live"] for w in pool.answering()]
        self.assertEqual(sum(live), 80, live)
        self.assertGreaterEqual(min(live), 20, live)

    def test_a_reuse_port_socket_per_worker(self) -> None:
        """Each worker slot gets a listening socket of its own on the same port, bound with SO_REUSEPORT."""
        from muxtwist.workers import WorkerPool

        pool = WorkerPool(3, ["tcp:0:interface=127.0.0.1"], [], handle_signals=False)
        pool.privilegedStartService()
        self.addCleanup(shutil.rmtree, pool.directory, True)
        sockets = pool.slot_sockets["tcp:0:interface=127.0.0.1"]
        self.addCleanup(lambda: [s.close() for s in sockets])
        self.assertEqual(pool.ports, {})
        self.assertEqual(len({s.fileno() for s in sockets}), 3)
        self.assertEqual(len({s.getsockname() for s in sockets}), 1)
        for s in sockets:
            self.assertEqual(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), 1)
        # Every one of them accepts: the kernel spreads connections over them.
        port = sockets[0].getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(60)]
        self.addCleanup(lambda: [c.close() for c in clients])
        accepted = []
        for s in sockets:
            n = 0
            while True:
                try:
                    s.accept()[0].close()
                except BlockingIOError:
                    break
                n += 1
            accepted.append(n)
        self.assertEqual(sum(accepted), 60)
        self.assertTrue(all(accepted), accepted)

    def test_shared_socket_without_reuse_port(self) -> None:
        """reuse_port=False keeps one listening socket that every worker accepts from."""
        from muxtwist.workers import WorkerPool

        pool = WorkerPool(2, ["tcp:0:interface=127.0.0.1"], [], handle_signals=False, reuse_port=False)
        pool.privilegedStartService()
        self.addCleanup(shutil.rmtree, pool.directory, True)
        port = pool.ports["tcp:0:interface=127.0.0.1"]
        self.addCleanup(port.stopListening)
        self.assertEqual(pool.slot_sockets, {})


class PacedTransfer:
    """A client sending a line every 0.1 s to the echo rule and reading each back."""

    def __init__(self, port: int, lines: int = 40) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.lines = [f"line {i:03d} of a paced transfer\n".encode() for i in range(lines)]
        self.sent = 0
        self.received = b""

    def step(self) -> None:
        self.sock.sendall(self.lines[self.sent])
        self.sent += 1
        want = b"".join(self.lines[: self.sent])
        while len(self.received) < len(want):
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AssertionError(f"closed after {len(self.received)} bytes of {len(want)}")
            self.received += chunk
        time.sleep(0.1)  # the pace of the client, not a wait for the server

    def finish(self) -> bytes:
        while self.sent < len(self.lines):
            self.step()
        self.sock.shutdown(socket.SHUT_WR)
        while chunk := self.sock.recv(4096):
            self.received += chunk
        self.sock.close()
        return self.received


class StopSignalTests(unittest.TestCase):
    """A stop signal drains each worker exactly once, however it arrives."""

    def _drains_once(self, send_signal: Any) -> str:
        pool = Pool(self)
        # Both workers serving (their stop handlers in place): a worker still
        # starting has nothing to drain and ends by the signal's default action.
        until(lambda: len(pool.answering()) == 2, 30, "both workers answering")
        transfer = PacedTransfer(pool.port)
        for _ in range(3):
            transfer.step()
        send_signal(pool)
        received = transfer.finish()
        self.assertEqual(received, b"".join(transfer.lines))
        code = pool.server.wait(30)
        self.assertEqual(code, 0, pool.server.output[-3000:])
        self.assertNotIn("aborting the remaining connections", pool.server.output)
        self.assertTrue(pool.worker_pids)
        for pid in pool.worker_pids:
            with self.assertRaises(ProcessLookupError):
                os.kill(pid, 0)
        return pool.server.output

    def test_ctrl_c_to_the_process_group_drains_once(self) -> None:
        """SIGINT to the process group of `twistd -n muxtwist --workers 2` lets a paced transfer finish; exit 0."""
        output = self._drains_once(lambda pool: os.killpg(pool.server.proc.pid, signal.SIGINT))
        # The parent alone got the Ctrl-C; each worker one SIGTERM, from the parent.
        self.assertEqual(output.count("received signal 2: stopping"), 1, output[-3000:])
        self.assertEqual(output.count("received signal 15: stopping"), 2, output[-3000:])

    def test_sigterm_to_every_process_drains_once(self) -> None:
        """SIGTERM to the parent and to each worker (systemd's KillMode=control-group) lets the transfer finish."""

        def every_process(pool: Pool) -> None:
            # The workers first, and the parent once one of them is draining
            # the transfer: its forwarded SIGTERM is the second one that worker gets.
            for pid in pool.children():
                os.kill(pid, signal.SIGTERM)
            until(lambda: "waiting up to" in pool.server.output, 15, "the worker with the transfer to drain")
            os.kill(pool.server.proc.pid, signal.SIGTERM)

        self._drains_once(every_process)


class ReloadWhileStoppingTests(unittest.SynchronousTestCase):
    """A reload asked while the pool stops is not passed on to the draining workers."""

    def test_reload_while_draining_signals_no_worker(self) -> None:
        """WorkerPool.reload() once stopping sends no SIGHUP: a worker past its drain would die of it."""
        import subprocess

        from muxtwist.workers import WorkerPool, _Worker

        # A stand-in worker that dies of a SIGHUP, as a worker does once its handlers are gone.
        child = subprocess.Popen(["sleep", "30"], start_new_session=True)
        self.addCleanup(lambda: (child.kill(), child.wait()))
        pool = WorkerPool(1, [], [], handle_signals=False)
        worker = _Worker(pool, 0)
        worker.pid = child.pid
        pool.workers[0] = worker
        pool._stopping = True
        pool.reload()
        deadline = time.monotonic() + 1.0
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertIsNone(child.returncode, "the draining worker got a SIGHUP")


class SpawnFailureTests(unittest.SynchronousTestCase):
    def test_a_worker_that_cannot_be_started_is_tried_again(self) -> None:
        """spawnProcess raising (EMFILE) is one error line and a retry later, which starts the worker."""
        import errno

        from twisted.internet.task import Clock
        from twisted.logger import capturedLogs

        from muxtwist.workers import WorkerPool

        class Reactor(Clock):
            spawned: list[object] = []

            def spawnProcess(self, protocol: object, *args: object, **kwargs: object) -> object:
                self.spawned.append(protocol)
                if len(self.spawned) == 1:
                    raise OSError(errno.EMFILE, "Too many open files")
                return object()

        reactor = Reactor()
        pool = WorkerPool(1, [], [], handle_signals=False, reactor=reactor)
        pool.directory = self.mktemp()
        os.makedirs(pool.directory)
        pool.running = True
        with capturedLogs() as events:
            pool._spawn(0)
        self.assertEqual(pool.workers, {})
        errors = [e for e in events if e.get("log_format", "").startswith("cannot start worker")]
        self.assertEqual([e["problem"] for e in errors], ["Too many open files"])
        self.assertEqual(len(reactor.getDelayedCalls()), 1, "no retry scheduled")
        reactor.advance(reactor.getDelayedCalls()[0].getTime() - reactor.seconds())
        self.assertEqual(len(reactor.spawned), 2)
        self.assertEqual(list(pool.workers), [0])

    def test_a_pool_that_cannot_start_says_why_to_start_failed(self) -> None:
        """A spawn failing at the start gives start_failed one line before SystemExit(1); its own errors are logged."""
        import errno

        from twisted.internet.task import Clock

        from muxtwist.workers import WorkerPool

        class Reactor(Clock):
            def spawnProcess(self, protocol: object, *args: object, **kwargs: object) -> object:
                raise OSError(errno.EMFILE, "Too many open files")

        told: list[str] = []

        def broken(problem: str) -> None:
            told.append(problem)
            raise RuntimeError("cannot tell")

        for start_failed, count in ((None, 0), (told.append, 1), (broken, 2)):
            pool = WorkerPool(2, [], [], handle_signals=False, start_failed=start_failed, reactor=Reactor())
            error = self.assertRaises(SystemExit, pool.startService)
            self.assertEqual((error.code, len(told)), (1, count))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        for problem in told:
            self.assertTrue(problem.startswith("cannot start 2 workers: Too many open files"), problem)


class WorkerLogNamespaceTests(unittest.SynchronousTestCase):
    def test_a_workers_lines_keep_the_pools_namespace(self) -> None:
        """What the parent logs of a worker (here its standard error) is in muxtwist.workers, as before the move."""
        from twisted.logger import capturedLogs

        from muxtwist.workers import WorkerPool, _Worker

        worker = _Worker(WorkerPool(1, [], [], handle_signals=False), 0)
        with capturedLogs() as events:
            worker.errReceived(b"oops\n")
        self.assertEqual([e["log_namespace"] for e in events], ["muxtwist.workers"])


class LogRelayTests(unittest.TestCase):
    """The workers' log lines reach the parent's one text log, whole, and only the parent writes that file."""

    def _echo_many(self, port: int, count: int) -> None:
        for _ in range(count):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"hi")
                self.assertEqual(s.recv(10), b"hi")

    def _rules(self, tmp: str) -> str:
        rules = os.path.join(tmp, "rules.py")
        with open(rules, "w") as f:
            f.write(RULES)
        return rules

    def _check(self, log: str, count: int) -> None:
        with open(log, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        stamped = [line for line in lines if len(line) > 24 and line[4] == "-" and line[10] == "T"]
        self.assertEqual(lines, stamped, "a line broken or overwritten")
        ends = [line for line in lines if "ended: handed_off, rule echo" in line]
        self.assertEqual(len(ends), count, lines[-20:])

    def _serve(self) -> tuple[Process, int, str]:
        """`twistd -n -l FILE muxtwist --workers 2` serving echo, listening; the process, its port and FILE."""
        from muxtwist.workers import worker_command

        tmp = tempfile.mkdtemp(prefix="muxtwist-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        log = os.path.join(tmp, "muxtwist.log")
        port = free_port()
        args = ["--config", self._rules(tmp), "--port", f"tcp:{port}:interface=127.0.0.1", "--workers", "2"]
        server = Process(worker_command(args, [f"--logfile={log}"]), os.path.join(tmp, "out"), env={"TMPDIR": tmp})
        self.addCleanup(server.kill)
        wait_for_port(port, server.proc)
        return server, port, log

    def test_workers_lines_reach_the_log_file_whole(self) -> None:
        """`twistd -n -l FILE muxtwist --workers 2`: every connection's line is in FILE, none broken, the last too."""
        server, port, log = self._serve()
        self._echo_many(port, 300)
        os.kill(server.proc.pid, signal.SIGTERM)
        self.assertEqual(server.wait(30), 0, server.output[-3000:])
        self._check(log, 300)
        with open(log, encoding="utf-8", errors="replace") as f:
            text = f.read()
        self.assertEqual(text.count("Main loop terminated."), 3, text[-3000:])  # the workers' last lines, and ours

    def test_a_worker_that_cannot_start_again_says_why_in_the_log_file(self) -> None:
        """A worker started again after its rules file broke: its error is in FILE, not only "exit code 1"."""
        import re

        server, port, log = self._serve()
        with open(os.path.join(os.path.dirname(log), "rules.py"), "w") as f:
            f.write("rules = [  # the file broken since the workers started\n")

        def text() -> str:
            with open(log, encoding="utf-8", errors="replace") as f:
                return f.read()

        until(lambda: re.search(r"worker 0 started: pid (\d+)", text()), 30, "worker 0's start")
        match = re.search(r"worker 0 started: pid (\d+)", text())
        assert match is not None
        os.kill(int(match.group(1)), signal.SIGKILL)
        until(lambda: "ended: exit code 1" in text(), 30, "the worker started again to fail")
        written = text()
        self.assertIn("standard error", written)
        self.assertIn("rules.py", written[written.index("standard error") :])
        os.kill(server.proc.pid, signal.SIGTERM)
        self.assertEqual(server.wait(30), 0, server.output[-3000:])

    def test_programs_a_worker_starts_do_not_ignore_sigusr1(self) -> None:
        """A worker's start-up catches SIGUSR1 rather than ignoring it, so the programs it starts get it as usual."""
        import subprocess
        import sys

        from muxtwist.workers import worker_command

        command = worker_command([], relayed_log=True)
        start_up = command[2].split("import sys; sys.argv[0] = 'twistd'")[0]
        check = "import subprocess; subprocess.run(['grep', '^SigIgn', '/proc/self/status'])\n"
        done = subprocess.run([sys.executable, "-c", start_up + check], capture_output=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        ignored = int(done.stdout.split()[1], 16)
        self.assertFalse(ignored & (1 << (signal.SIGUSR1 - 1)), done.stdout)

    def test_workers_log_through_the_logger_twistd_was_given(self) -> None:
        """`twistd --logger X muxtwist --workers 2`: the workers' connection lines go to X as well, not their stdout."""
        from muxtwist.workers import worker_command

        tmp = tempfile.mkdtemp(prefix="muxtwist-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        lines = os.path.join(tmp, "observed.log")
        with open(os.path.join(tmp, "observed.py"), "w") as f:
            f.write(
                "import os\n"
                "from twisted.logger import textFileLogObserver\n"
                "def observer():\n"
                "    return textFileLogObserver(open(os.environ['OBSERVED'], 'a'))\n"
            )
        port = free_port()
        args = ["--config", self._rules(tmp), "--port", f"tcp:{port}:interface=127.0.0.1", "--workers", "2"]
        env = {"TMPDIR": tmp, "OBSERVED": lines, "PYTHONPATH": os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")])}
        server = Process(worker_command(args, ["--logger=observed.observer"]), os.path.join(tmp, "out"), env=env)
        self.addCleanup(server.kill)
        wait_for_port(port, server.proc)
        self._echo_many(port, 20)
        os.kill(server.proc.pid, signal.SIGTERM)
        self.assertEqual(server.wait(30), 0, server.output[-3000:])
        with open(lines, encoding="utf-8", errors="replace") as f:
            ends = [line for line in f if "ended: handed_off, rule echo" in line]
        self.assertEqual(len(ends), 20, server.output[-2000:])

    def test_a_worker_is_started_again_while_a_program_it_started_holds_its_output(self) -> None:
        """A killed worker whose rules file started a program that keeps its stdout and stderr: seen and replaced."""
        import re

        server, port, log = self._serve()
        tmp = os.path.dirname(log)
        pids = os.path.join(tmp, "helpers")
        with open(os.path.join(tmp, "rules.py"), "a") as f:
            f.write(
                "import os, subprocess\n"
                "helper = subprocess.Popen(['sleep', '60'], stdin=subprocess.DEVNULL, start_new_session=True)\n"
                f"with open({pids!r}, 'a') as pids:\n"
                "    pids.write(f'{helper.pid}\\n')\n"
            )

        def stop_helpers() -> None:
            with open(pids) as f:
                for line in f:
                    try:
                        os.kill(int(line), signal.SIGKILL)
                    except ProcessLookupError:
                        pass

        def text() -> str:
            with open(log, encoding="utf-8", errors="replace") as f:
                return f.read()

        # The workers that loaded the file above: the ones started after the write.
        os.kill(server.proc.pid, signal.SIGHUP)
        until(lambda: os.path.exists(pids), 30, "a helper started")
        self.addCleanup(stop_helpers)
        until(lambda: re.search(r"worker 0 started: pid (\d+)", text()), 30, "worker 0's start")
        match = re.search(r"worker 0 started: pid (\d+)", text())
        assert match is not None
        os.kill(int(match.group(1)), signal.SIGKILL)
        until(lambda: len(re.findall(r"worker 0 started: pid", text())) >= 2, 15, "worker 0 started again")
        self._echo_many(port, 5)
        os.kill(server.proc.pid, signal.SIGTERM)
        self.assertEqual(server.wait(30), 0, server.output[-3000:])

    def test_daemon_workers_log_to_twistd_log(self) -> None:
        """A daemon with --workers and no --logfile: the workers' lines are in twistd.log too."""
        import subprocess
        import sys

        tmp = tempfile.mkdtemp(prefix="muxtwist-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        port = free_port()
        pidfile = os.path.join(tmp, "twistd.pid")
        command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", f"--pidfile={pidfile}"]
        command += ["muxtwist", "--config", self._rules(tmp), "--port", f"tcp:{port}:interface=127.0.0.1"]
        command += ["--workers", "2"]
        done = subprocess.run(command, cwd=tmp, env=dict(os.environ, TMPDIR=tmp), timeout=60, capture_output=True)
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        until(lambda: os.path.exists(pidfile), 30, "the pid file")
        with open(pidfile) as f:
            pid = int(f.read())

        def stop() -> None:
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)  # a daemon leads no group of its own
            except ProcessLookupError:
                pass

        self.addCleanup(stop)

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            except OSError:
                return False
            return True

        until(listening, 30, "the daemon's port")
        self._echo_many(port, 100)
        os.kill(pid, signal.SIGTERM)
        until(lambda: not os.path.exists(f"/proc/{pid}"), 30, "the daemon to exit")
        self._check(os.path.join(tmp, "twistd.log"), 100)

    def test_events_are_relayed_whole(self) -> None:
        """A worker's output cut anywhere is written as whole events, several lines each; a rest ends in a newline."""
        from muxtwist import _worker, workers
        from muxtwist._worker_log import RECORD_END

        written: list[bytes] = []
        self.patch(_worker, "write_log_lines", written.append)
        worker = _worker._Worker(workers.WorkerPool(1, [], [], handle_signals=False), 0)
        stream = b"one\n" + RECORD_END + b"two\n\ttraceback\n\tmore\n" + RECORD_END + b"three\n" + RECORD_END + b"rest"
        for cut in range(0, len(stream), 5):
            worker.outReceived(stream[cut : cut + 5])
        self.assertEqual(b"".join(written), b"one\ntwo\n\ttraceback\n\tmore\nthree\n")
        (event,) = [piece for piece in written if b"traceback" in piece]
        self.assertIn(b"two\n\ttraceback\n\tmore\n", event)
        worker.outConnectionLost()
        self.assertEqual(written[-1], b"rest\n")
        worker.outReceived(b"x" * (_worker._LONGEST_RECORD + 1))
        self.assertEqual(written[-1], b"x" * (_worker._LONGEST_RECORD + 1))

    def test_a_stopped_parent_does_not_stop_the_workers(self) -> None:
        """With the parent stopped (SIGSTOP), the workers serve on, holding their lines; every line arrives after."""
        server, port, log = self._serve()

        def workers_serving() -> bool:
            # Each worker's start-up line, relayed: the parent's reactor runs, its signal handlers are in place.
            with open(log, errors="replace") as f:
                return f.read().count("SniffingFactory starting on") >= 2

        until(workers_serving, 30, "both workers' start-up lines in the log")
        os.kill(server.proc.pid, signal.SIGSTOP)
        self.addCleanup(lambda: server.proc.poll() is None and os.kill(server.proc.pid, signal.SIGCONT))
        # About 200 bytes of log a connection: 1,500 fill both workers' 64 KiB pipes.
        self._echo_many(port, 1500)
        os.kill(server.proc.pid, signal.SIGCONT)
        os.kill(server.proc.pid, signal.SIGTERM)
        self.assertEqual(server.wait(30), 0, server.output[-3000:])
        self._check(log, 1500)


class ParentKilledTests(unittest.TestCase):
    """The parent of a pool killed with SIGKILL: the workers stop by themselves and leave nothing behind."""

    def test_workers_outlive_no_killed_parent_and_leave_no_directory(self) -> None:
        """After SIGKILL to the parent, every worker exits (PR_SET_PDEATHSIG) and the sockets' directory is gone."""
        pool = Pool(self)
        until(lambda: len(pool.answering()) == 2, 30, "both workers answering")
        workers = pool.children()
        (directory,) = {workers_directory(pid) for pid in workers}
        self.assertTrue(os.path.isdir(directory))
        os.kill(pool.server.proc.pid, signal.SIGKILL)
        pool.server.wait(10)
        until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers), 30, "the workers to exit")
        self.assertFalse(os.path.exists(directory), os.listdir(directory) if os.path.isdir(directory) else None)


def workers_directory(pid: int) -> str:
    """The MUXTWIST_WORKERS_DIR of a running worker, from its environment."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return env[b"MUXTWIST_WORKERS_DIR"].decode()


class SocketDirectoryTests(unittest.SynchronousTestCase):
    """Where the workers' admin sockets go."""

    def test_a_long_tmpdir_still_gives_sockets_a_path_that_binds(self) -> None:
        """With a TMPDIR so long that worker-N.sock would pass AF_UNIX's 107 bytes, the sockets go where they fit."""
        from muxtwist.workers import WorkerPool

        scratch = tempfile.mkdtemp(prefix="muxtwist-test-")
        self.addCleanup(shutil.rmtree, scratch, True)
        long_tmp = os.path.join(scratch, "t" * (100 - len(scratch)))
        os.mkdir(long_tmp)
        self.patch(tempfile, "tempdir", long_tmp)
        pool = WorkerPool(12, [], [], handle_signals=False)
        pool.privilegedStartService()
        assert pool.directory is not None
        self.addCleanup(shutil.rmtree, pool.directory, True)
        self.assertEqual(os.stat(pool.directory).st_mode & 0o777, 0o700)
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(os.path.join(pool.directory, "worker-11.sock"))

    def test_start_after_privileged_start_listens_once(self) -> None:
        """startService() after privilegedStartService() (as twistd runs them) binds no second set of sockets."""
        from muxtwist.workers import WorkerPool

        scratch = tempfile.mkdtemp(prefix="muxtwist-test-")
        self.addCleanup(shutil.rmtree, scratch, True)
        self.patch(tempfile, "tempdir", scratch)
        pool = WorkerPool(2, ["tcp:0:interface=127.0.0.1"], [], handle_signals=False)
        self.patch(pool, "_spawn", lambda slot: None)
        pool.privilegedStartService()
        made = {d: list(s) for d, s in pool.slot_sockets.items()} or dict(pool.ports)
        pool.startService()
        self.addCleanup(pool.stopService)
        now = {d: list(s) for d, s in pool.slot_sockets.items()} or dict(pool.ports)
        self.assertEqual(now, made)

    def test_a_pool_that_cannot_listen_leaves_no_directory(self) -> None:
        """A pool whose port is taken fails to start and leaves no sockets' directory behind."""
        from twisted.internet.error import CannotListenError

        from muxtwist.workers import WorkerPool

        scratch = tempfile.mkdtemp(prefix="muxtwist-test-")
        self.addCleanup(shutil.rmtree, scratch, True)
        self.patch(tempfile, "tempdir", scratch)
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        for reuse_port in (False, True):
            pool = WorkerPool(2, [f"tcp:{port}:interface=127.0.0.1"], [], handle_signals=False, reuse_port=reuse_port)
            with self.assertRaises(CannotListenError):
                pool.privilegedStartService()
            self.assertEqual(os.listdir(scratch), [])


class SwitchedUserTests(unittest.TestCase):
    """``twistd --uid nobody --gid NOBODY'S-GROUP muxtwist --workers 2`` started as root, end to end."""

    def _nobody(self) -> tuple[int, int]:
        import pwd

        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root: twistd --uid switches to another user only when started as root")
        try:
            entry = pwd.getpwnam("nobody")
        except KeyError:
            raise unittest.SkipTest("there is no user 'nobody' to switch to") from None
        return entry.pw_uid, entry.pw_gid

    def _tree(self) -> tuple[int, int, str, list[str], str, str]:
        """
        nobody's uid and gid, a temporary directory open to it, the command
        prefix under which it runs this checkout, a scratch directory for
        the workers' sockets (like /tmp: anyone may make a directory there,
        and only its owner may remove it) and the rules file.
        """
        # Also called with another test case as self (the tests below).
        uid, gid = SwitchedUserTests._nobody(self)
        tmp = tempfile.mkdtemp(prefix="muxtwist-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        os.chmod(tmp, 0o755)
        prefix = SwitchedUserTests._reachable(self, tmp, uid, gid)
        scratch = os.path.join(tmp, "tmp")
        os.mkdir(scratch)
        os.chmod(scratch, 0o1777)
        rules = os.path.join(tmp, "rules.py")
        with open(rules, "w") as f:
            f.write(RULES)
        os.chmod(rules, 0o644)
        return uid, gid, tmp, prefix, scratch, rules

    def _reachable(self, tmp: str, uid: int, gid: int) -> list[str]:
        """
        A command prefix under which user ``uid`` can run this interpreter and
        import this checkout: none, or, where a directory closed to others
        (``/root``) holds them, a private mount namespace in which that
        directory is an empty one open to all with the interpreter and the
        checkout mounted back at their own paths (the interpreter's library
        path is absolute). Nothing changes outside the namespace.
        """
        import shlex
        import subprocess
        import sys

        import muxtwist

        # The switched user must also start the interpreter again (twistd
        # spawns its workers): setpriv's own exec still has root's
        # capabilities, so a path through a closed directory (a virtualenv's
        # link to an interpreter under /root) passes the first exec only.
        again = "import subprocess, sys; subprocess.run([sys.executable, '-c', ''], check=True)"
        probe = [sys.executable, "-c", f"import muxtwist, twisted.scripts.twistd; {again}"]
        as_user = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
        ran = subprocess.run([*as_user, *probe], capture_output=True, timeout=60)
        if ran.returncode == 0:
            return []
        needed = [os.path.realpath(sys.base_prefix), os.path.dirname(os.path.dirname(muxtwist.__file__))]
        parents = {"/".join(path.split("/")[:i]) for path in needed for i in range(2, path.count("/") + 1)}
        closed = {d for d in parents if not os.stat(d).st_mode & 0o001}
        if len(closed) != 1 or shutil.which("unshare") is None:
            raise unittest.SkipTest(f"user nobody cannot run {sys.executable}: {ran.stderr.decode()[-300:]}")
        (top,) = closed
        inside = [path for path in needed if path.startswith(top + "/")]
        stages = [os.path.join(tmp, f"stage-{i}") for i in range(len(inside))]
        script = ["set -e"]
        for path, stage in zip(inside, stages, strict=True):
            os.mkdir(stage)
            script.append(f"mount --bind {shlex.quote(path)} {shlex.quote(stage)}")
        script.append(f"mount -t tmpfs -o mode=755 tmpfs {shlex.quote(top)}")
        for path, stage in zip(inside, stages, strict=True):
            script += [f"mkdir -p {shlex.quote(path)}", f"mount --move {shlex.quote(stage)} {shlex.quote(path)}"]
        script.append('exec "$@"')
        prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script), "sh"]
        ran = subprocess.run([*prefix, *as_user, *probe], capture_output=True, timeout=60)
        if ran.returncode != 0:
            raise unittest.SkipTest(f"user nobody cannot run {sys.executable}: {ran.stderr.decode()[-300:]}")
        return prefix

    def test_workers_of_a_switched_user_serve_reload_stop_and_leave_no_directory(self) -> None:
        """Workers run as nobody, bind their sockets in a directory nobody owns, reload, stop, and remove it."""
        from muxtwist.workers import worker_command
        from tests.test_admin_page import Process, free_port, until, wait_for_port

        uid, gid, tmp, prefix, scratch, rules = self._tree()
        port, admin = free_port(), free_port()
        command = worker_command(
            [
                "--config",
                rules,
                "--port",
                f"tcp:{port}:interface=127.0.0.1",
                "--admin",
                f"tcp:{admin}:interface=127.0.0.1",
                "--workers",
                "2",
            ],
            # A working directory the switched user can enter (the test run's is closed to it).
            ["--uid", str(uid), "--gid", str(gid), "--rundir", tmp],
        )
        server = Process([*prefix, *command], os.path.join(tmp, "twistd.log"), env={"TMPDIR": scratch})
        workers: set[int] = set()

        def kill() -> None:
            # Each worker leads a process group of its own.
            for pid in workers:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            server.kill()

        self.addCleanup(kill)

        def answering() -> list[dict[str, Any]]:
            status = json.loads(get(admin, "/status.json"))
            found = [w for w in status["workers"] if w.get("answered")]
            workers.update(w["pid"] for w in found)
            return found

        def waiting(condition: Any, what: str) -> None:
            try:
                until(condition, 30, what)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{server.output[-4000:]}") from None

        wait_for_port(port, server.proc)
        wait_for_port(admin, server.proc)
        waiting(lambda: len(answering()) == 2, "both workers answering the admin site")
        started = set(workers)
        for pid in [server.proc.pid, *started]:
            self.assertEqual(os.stat(f"/proc/{pid}").st_uid, uid, pid)
        (directory,) = {workers_directory(pid) for pid in started}
        self.assertEqual(os.path.dirname(directory), scratch)
        info = os.stat(directory)
        self.assertEqual((info.st_uid, info.st_mode & 0o777), (uid, 0o700))

        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"hello\n")
            self.assertEqual(s.recv(100), b"hello\n")

        os.kill(server.proc.pid, signal.SIGHUP)
        waiting(lambda: server.output.count(f"reloaded {rules}") == 2, "both workers to reload")
        self.assertEqual({w["pid"] for w in answering()}, started)

        os.kill(server.proc.pid, signal.SIGTERM)
        self.assertEqual(server.wait(30), 0, server.output[-3000:])
        for pid in started:
            with self.assertRaises(ProcessLookupError):
                os.kill(pid, 0)
        self.assertEqual(os.listdir(scratch), [])


class SwitchedUserNotRootTests(unittest.TestCase):
    """``twistd --uid``/``--gid muxtwist --workers 2`` started by a user who cannot switch to them."""

    def test_a_user_that_cannot_switch_gets_a_clear_error_and_no_directory_is_left(self) -> None:
        """Started as nobody with ``--uid 0 --gid 0``: exit 1 with one clear line, no traceback, no directory left."""
        import subprocess

        from muxtwist.workers import worker_command

        uid, gid, tmp, prefix, scratch, rules = SwitchedUserTests._tree(self)  # type: ignore[arg-type]
        command = worker_command(
            ["--config", rules, "--port", f"tcp:{free_port()}:interface=127.0.0.1", "--workers", "2"],
            ["--uid", "0", "--gid", "0", "--rundir", tmp],
        )
        as_nobody = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
        ran = subprocess.run(
            [*prefix, *as_nobody, *command],
            capture_output=True,
            timeout=60,
            env=dict(os.environ, TMPDIR=scratch),
            start_new_session=True,
        )
        output = (ran.stdout + ran.stderr).decode(errors="replace")
        self.assertEqual(ran.returncode, 1, output[-3000:])
        self.assertNotIn("Traceback", output)
        self.assertIn("muxtwist: cannot give", output)
        self.assertEqual(os.listdir(scratch), [])


class SwitchedUserStartFailsTests(unittest.TestCase):
    """twistd fails after the pool made its directory (a ``--uid`` number with no passwd entry): nothing is left."""

    def test_a_uid_with_no_passwd_entry_leaves_no_directory(self) -> None:
        """``--uid N`` where no user has uid N: twistd exits non-zero before the reactor runs; the directory goes."""
        import pwd
        import subprocess

        from muxtwist.workers import worker_command

        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root: the directory is given to the --uid user only when started as root")
        uid = next(n for n in range(54321, 54421) if not any(e.pw_uid == n for e in pwd.getpwall()))
        tmp = tempfile.mkdtemp(prefix="muxtwist-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        rules = os.path.join(tmp, "rules.py")
        with open(rules, "w") as f:
            f.write(RULES)
        command = worker_command(
            ["--config", rules, "--port", f"tcp:{free_port()}:interface=127.0.0.1", "--workers", "2"],
            ["--uid", str(uid), "--rundir", tmp],
        )
        ran = subprocess.run(
            command, capture_output=True, timeout=60, env=dict(os.environ, TMPDIR=tmp), start_new_session=True
        )
        output = (ran.stdout + ran.stderr).decode(errors="replace")
        self.assertNotEqual(ran.returncode, 0, output[-3000:])
        self.assertIn(f"uid not found: {uid}", output)
        self.assertEqual([n for n in os.listdir(tmp) if n.startswith("muxtwist-workers-")], [], output[-3000:])


#: A twistd --logger for the parent of a pool (twistd calls it after parsing
#: the options, before the pool listens and starts its workers) that leaves
#: it HOLD_FREE descriptors under its limit: what a log observer, a rules
#: file's own files or a leak can take once the --workers count was checked.
HOLD_FILES = """\
import os, resource, sys

from twisted.logger import textFileLogObserver

held = []


def observer():
    if "MUXTWIST_WORKER" not in os.environ:
        free = int(os.environ["HOLD_FREE"])
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        while soft - (len(os.listdir("/proc/self/fd")) - 1) > free:
            held.append(os.open(os.devnull, os.O_RDONLY))
    # A daemon's standard output is /dev/null: it logs to HOLD_LOG when given.
    log = os.environ.get("HOLD_LOG")
    return textFileLogObserver(open(log, "a") if log else sys.stdout)
"""


class OutOfDescriptorsAtStartTests(unittest.TestCase):
    """A pool that runs out of descriptors while it starts says so in one line, stops what it started and exits 1."""

    def start(self, free: int, daemon: bool = False) -> tuple[int, str, str]:
        """
        ``twistd muxtwist --workers 6`` at a 64-file limit with ``free``
        descriptors left: exit code, log, TMPDIR. A ``daemon``'s log is its
        file's, followed by what the command wrote.
        """
        import resource
        import subprocess

        from muxtwist.workers import worker_command
        from tests.processes import output_after_stop, stop_group
        from tests.twistd import ROOT

        if not os.path.isdir("/proc/self/fd"):
            raise unittest.SkipTest("counts descriptors in /proc/self/fd")
        folder = tempfile.mkdtemp(prefix="muxtwist-test-")
        self.addCleanup(shutil.rmtree, folder, True)
        with open(os.path.join(folder, "hold_files.py"), "w") as f:
            f.write(HOLD_FILES)
        tmp = os.path.join(folder, "tmp")
        os.mkdir(tmp)

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

        args = ["--port", "tcp:0:interface=127.0.0.1", "--workers", "6"]
        command = worker_command(args, ["--logger=hold_files.observer"])
        env = dict(os.environ, HOLD_FREE=str(free), TMPDIR=tmp, PYTHONPATH=ROOT)
        log = os.path.join(folder, "twistd.log")
        if daemon:
            command.remove("-n")
            command[command.index("--pidfile=")] = "--pidfile=" + os.path.join(folder, "twistd.pid")
            env["HOLD_LOG"] = log
        proc = subprocess.Popen(
            command,
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=limit,
        )
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            stop_group(proc)  # its workers are in process groups of their own
            out, _ = output_after_stop(proc)
        if daemon and os.path.exists(log):
            with open(log) as f:
                out = f.read().encode() + out
        return proc.returncode, out.decode(errors="replace"), tmp

    def test_a_worker_that_cannot_be_started_stops_the_pool(self) -> None:
        """Out of descriptors at a spawn: one line naming the count and the cause; the started workers are stopped."""
        code, log, tmp = self.start(free=11)
        self.assertNotIn("Traceback", log)
        self.assertEqual(code, 1, log[-3000:])
        pids = [int(line.rsplit("pid ", 1)[1]) for line in log.splitlines() if " started: pid " in line]
        self.assertTrue(0 < len(pids) < 6, log[-3000:])
        (line,) = [line for line in log.splitlines() if "#error]" in line]
        self.assertTrue(
            line.endswith(
                f"[muxtwist.workers#error] cannot start 6 workers: worker {len(pids)} could not be started:"
                f" Too many open files (this process may open 64 files: ulimit -n); stopping the {len(pids)} started"
                " and exiting"
            ),
            line,
        )
        for pid in pids:
            self.assertFalse(os.path.exists(f"/proc/{pid}"), f"worker pid {pid} left running")
        self.assertEqual(os.listdir(tmp), [])

    def test_listening_sockets_that_cannot_be_made_stop_the_pool(self) -> None:
        """Out of descriptors for the workers' listening sockets: one line, no worker started, exit 1."""
        code, log, tmp = self.start(free=2)
        self.assertNotIn("Traceback", log)
        self.assertEqual(code, 1, log[-3000:])
        self.assertNotIn(" started: pid ", log)
        (line,) = [line for line in log.splitlines() if "#error]" in line]
        self.assertTrue(
            line.endswith(
                "[muxtwist.workers#error] cannot start 6 workers: their listening sockets need more descriptors:"
                " Too many open files (this process may open 64 files: ulimit -n)"
            ),
            line,
        )
        self.assertEqual(os.listdir(tmp), [])

    def test_a_daemon_that_cannot_start_the_pool_says_why_on_the_terminal(self) -> None:
        """In daemon mode the command twistd leaves in the foreground prints the reason and exits 1, at once."""
        # Two descriptors fewer than in the foreground: the daemon keeps both ends of twistd's status pipe.
        code, log, tmp = self.start(free=4, daemon=True)
        # Its pid file goes with it, as when twistd reports a failed start itself.
        self.assertFalse(os.path.exists(os.path.join(os.path.dirname(tmp), "twistd.pid")))
        self.assertIn(
            "[muxtwist.workers#error] cannot start 6 workers: their listening sockets need more descriptors:", log
        )
        self.assertEqual(code, 1, log[-3000:])
        self.assertTrue(
            log.endswith(
                "An error has occurred: b'cannot start 6 workers: Too many open files (this process may open 64 files:"
                " ulimit -n)'\nPlease look at log file for more information.\n"
            ),
            log[-3000:],
        )
        self.assertEqual(os.listdir(tmp), [])


class WorkersProblemTests(unittest.SynchronousTestCase):
    """The --workers count checked against the open-file limit and the machine's memory."""

    def test_counts_that_fit_pass(self) -> None:
        """A count whose descriptors and memory fit is no problem; --workers 1 is never one."""
        from muxtwist._worker_limits import workers_problem

        fits = {"open_files": 10, "limit": 1024, "memory": 8 * 2**30}
        self.assertIsNone(workers_problem(4, ["tcp:3000"], admin=True, **fits))
        self.assertIsNone(workers_problem(1, ["tcp:3000"], admin=False, open_files=10, limit=20, memory=1))

    def test_admin_and_more_listeners_cost_a_descriptor_each_per_worker(self) -> None:
        """Each tcp listener and --admin add one descriptor a worker, and the most that fit say so."""
        from muxtwist._worker_limits import workers_problem

        problem = workers_problem(
            200, ["tcp:3000", "tcp6:3001", "unix:/run/mux.sock"], admin=True, open_files=10, limit=1024, memory=2**40
        )
        assert problem is not None
        self.assertIn("(6 a worker: 3 pipes, 2 listening sockets, a connection to its admin socket)", problem)
        # 10 open, 16 reserved, the unix socket and the admin port: (1024 - 28) // 6.
        self.assertTrue(problem.endswith("give at most 166, or raise the limit"), problem)
        self.assertIsNone(
            workers_problem(166, ["tcp:3000", "tcp6:3001", "unix:/run/mux.sock"], admin=True, open_files=10, limit=1024)
        )

    def test_more_workers_than_memory_holds(self) -> None:
        """With a high open-file limit, a count whose workers cannot fit in the machine's memory is refused."""
        from muxtwist._worker_limits import WORKER_MEMORY, workers_problem

        problem = workers_problem(100000, ["tcp:3000"], admin=False, open_files=10, limit=2**20, memory=4 * 2**30)
        self.assertEqual(
            problem,
            f"--workers 100000 needs more memory than this machine has: each worker is a Python process of at least"
            f" {WORKER_MEMORY // 2**20} MB, and there are 4096 MB in all: give at most {4 * 2**30 // WORKER_MEMORY}",
        )
