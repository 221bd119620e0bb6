"""
A rules file that installs its own SIGHUP and SIGTERM handlers, run by a
real ``twistd -n muxtwist``: muxtwist keeps its own handlers, so every
SIGHUP still reloads and SIGTERM still stops, and says once per load that
the file replaced them.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.trial import unittest

from muxtwist._signals import SignalHandlers
from tests.test_admin_page import free_port, twistd, until, wait_for_port

RULES = """\
import signal

from twisted.internet.protocol import Factory

from muxtwist import Rule
from muxtwist.default import Echo
from muxtwist.matchers import Any


def _mine(signum, frame):
    pass


signal.signal(signal.SIGHUP, _mine)
signal.signal(signal.SIGTERM, _mine)

rules = [Rule(Any(), Factory.forProtocol(Echo), name="echo")]
shutdown_timeout = 5.0
"""

#: The start of the warning muxtwist logs when a rules file replaced its handlers.
REPLACED = "replaced muxtwist's handler"


def echo(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"hello\n")
        return s.recv(100)


class RulesFileSignalHandlerTests(unittest.TestCase):
    """A rules file's own signal handlers do not take SIGHUP and SIGTERM from muxtwist."""

    def test_every_sighup_reloads_though_the_rules_file_sets_its_own_handler(self) -> None:
        """Three SIGHUPs give three reloads, each load warns once, the process serves, and SIGTERM stops it."""
        tmp = tempfile.mkdtemp(prefix="muxtwist-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        rules = os.path.join(tmp, "rules.py")
        with open(rules, "w") as f:
            f.write(RULES)
        port = free_port()
        server = twistd(tmp, "--config", rules, "--port", f"tcp:{port}:interface=127.0.0.1")
        self.addCleanup(server.kill)

        def waiting(condition: Callable[[], object], what: str) -> None:
            try:
                until(condition, 15, what)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{server.output[-3000:]}") from None

        def reloads_are(n: int) -> bool:
            return server.output.count(f"reloaded {rules}") == n

        wait_for_port(port, server.proc)
        self.assertEqual(echo(port), b"hello\n")
        for n in (1, 2, 3):
            os.kill(server.proc.pid, signal.SIGHUP)
            waiting(functools.partial(reloads_are, n), f"reload {n}")
            self.assertEqual(echo(port), b"hello\n")
        self.assertIsNone(server.proc.poll())
        # The load at start and each of the three reloads.
        self.assertEqual(server.output.count(REPLACED), 4, server.output[-3000:])

        os.kill(server.proc.pid, signal.SIGTERM)
        self.assertEqual(server.wait(30), 0, server.output[-3000:])
        self.assertIn("received signal 15: stopping", server.output)


class KeepOurHandlersTests(unittest.SynchronousTestCase):
    """load_config() puts back muxtwist's handlers a rules file replaced, and only those."""

    def _rules(self) -> str:
        tmp = tempfile.mkdtemp(prefix="muxtwist-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, "rules.py")
        with open(path, "w") as f:
            f.write(RULES)
        for signum in (signal.SIGHUP, signal.SIGTERM):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        return path

    def test_muxtwists_handlers_are_put_back_with_one_warning(self) -> None:
        """A service's SIGHUP and SIGTERM handlers replaced by the file are back after load_config, with one warning."""
        from twisted.logger import globalLogPublisher

        from muxtwist.config import load_config
        from muxtwist.service import MuxService

        path = self._rules()
        service = MuxService()
        signal.signal(signal.SIGHUP, service._sighup)
        signal.signal(signal.SIGTERM, service._stop_signal)
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        load_config(path)
        self.assertEqual(signal.getsignal(signal.SIGHUP), service._sighup)
        self.assertEqual(signal.getsignal(signal.SIGTERM), service._stop_signal)
        warned = [e for e in events if REPLACED in str(e.get("log_format", ""))]
        self.assertEqual(len(warned), 1, events)
        self.assertEqual((warned[0]["path"], warned[0]["signals"]), (path, "SIGHUP, SIGTERM"))

    def test_a_handler_that_is_not_muxtwists_is_the_files_to_change(self) -> None:
        """With an embedding program's own SIGHUP handler in place, the handler the file installs stays."""
        from muxtwist.config import load_config

        path = self._rules()

        def programs(signum: int, frame: object) -> None:
            pass

        signal.signal(signal.SIGHUP, programs)
        load_config(path)
        installed = signal.getsignal(signal.SIGHUP)
        self.assertNotEqual(installed, programs)
        self.assertEqual(getattr(installed, "__name__", None), "_mine")


#: A rules file that gives SIGHUP and SIGTERM their default action (death)
#: and, at a load after the file ``signal-me`` appeared, sends itself the
#: signal named there: a signal that arrives while the file runs.
SIGNALS_ITSELF = """\
import os
import signal

from twisted.internet.protocol import Factory

from muxtwist import Rule
from muxtwist.default import Echo
from muxtwist.matchers import Any

signal.signal(signal.SIGHUP, signal.SIG_DFL)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
_trigger = os.path.join(os.path.dirname(__file__), "signal-me")
if os.path.exists(_trigger):
    with open(_trigger) as f:
        _signum = int(f.read())
    os.remove(_trigger)
    os.kill(os.getpid(), _signum)

rules = [Rule(Any(), Factory.forProtocol(Echo), name="echo")]
shutdown_timeout = 5.0
"""


class SignalWhileTheFileRunsTests(unittest.TestCase):
    """A signal that arrives while a rules file that replaced muxtwist's handler runs is muxtwist's."""

    def _start(self) -> tuple[str, int, Any]:
        tmp = tempfile.mkdtemp(prefix="muxtwist-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        rules = os.path.join(tmp, "rules.py")
        with open(rules, "w") as f:
            f.write(SIGNALS_ITSELF)
        port = free_port()
        server = twistd(tmp, "--config", rules, "--port", f"tcp:{port}:interface=127.0.0.1")
        self.addCleanup(server.kill)
        wait_for_port(port, server.proc)
        self.assertEqual(echo(port), b"hello\n")
        return tmp, port, server

    def test_a_sighup_during_a_reload_reloads_again_though_the_file_sets_sig_dfl(self) -> None:
        """A SIGHUP during a reload, the file having set SIGHUP's default action, gives another reload, not death."""
        tmp, port, server = self._start()
        with open(os.path.join(tmp, "signal-me"), "w") as f:
            f.write(str(int(signal.SIGHUP)))
        os.kill(server.proc.pid, signal.SIGHUP)
        try:
            until(lambda: server.output.count("reloaded ") == 2 or server.proc.poll() is not None, 15, "two reloads")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{server.output[-3000:]}") from None
        self.assertIsNone(server.proc.poll(), server.output[-3000:])
        self.assertEqual(echo(port), b"hello\n")
        os.kill(server.proc.pid, signal.SIGTERM)
        self.assertEqual(server.wait(30), 0, server.output[-3000:])

    def test_a_sigterm_during_a_reload_stops_gracefully_though_the_file_sets_sig_dfl(self) -> None:
        """A SIGTERM during a reload, the file having set SIGTERM's default action, stops the process with status 0."""
        tmp, port, server = self._start()
        with open(os.path.join(tmp, "signal-me"), "w") as f:
            f.write(str(int(signal.SIGTERM)))
        os.kill(server.proc.pid, signal.SIGHUP)
        self.assertEqual(server.wait(30), 0, server.output[-3000:])
        self.assertIn("received signal 15: stopping", server.output)


class _Handlers(SignalHandlers):
    """muxtwist's signal handlers on a reactor that only records what it is asked to call."""

    running = 1

    def __init__(self) -> None:
        self.calls: list[object] = []
        self._reactor = self
        self._old_handlers = {}

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.calls.append(functools.partial(f, *args, **kwargs) if args or kwargs else f)

    def stop(self) -> None:
        pass

    def reload(self) -> None:
        pass


class HandlerOfTheFileTests(unittest.SynchronousTestCase):
    """load_config() with muxtwist's handler in: a signal during the file's run does not reach the file's handler."""

    def test_a_raising_handler_of_the_file_neither_fails_the_load_nor_takes_the_signal(self) -> None:
        """The file's SIGHUP handler raises; a SIGHUP while the file runs reaches muxtwist's, and the load succeeds."""
        from muxtwist.config import load_config

        tmp = tempfile.mkdtemp(prefix="muxtwist-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, "rules.py")
        with open(path, "w") as f:
            f.write(
                RULES.replace("    pass\n", "    raise RuntimeError('the file handled it')\n").replace(
                    "rules = [", "import os\nos.kill(os.getpid(), signal.SIGHUP)\n\nrules = ["
                )
            )
        for signum in (signal.SIGHUP, signal.SIGTERM):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        handlers = _Handlers()
        signal.signal(signal.SIGHUP, handlers._sighup)
        signal.signal(signal.SIGTERM, handlers._stop_signal)
        config = load_config(path)
        self.assertIsNotNone(config.rules)
        self.assertEqual(handlers.calls, [handlers._queued_reload])
        self.assertEqual(signal.getsignal(signal.SIGHUP), handlers._sighup)


class LoggingFromTheHandlerTests(unittest.SynchronousTestCase):
    """What the stop signal's handler says is said from the reactor, not from inside the handler."""

    def test_the_stop_handler_logs_nothing_itself(self) -> None:
        """SIGTERM's handler (first, again, and in a draining worker) only asks the reactor to log and stop."""
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        handlers = _Handlers()
        handlers._stop_signal(signal.SIGTERM, None)
        handlers.running = 0
        handlers.stop_now = lambda: None  # type: ignore[attr-defined]
        handlers._stop_signal(signal.SIGTERM, None)
        handlers.in_worker = True  # type: ignore[attr-defined]
        handlers._stop_signal(signal.SIGTERM, None)
        said = [e for e in events if e.get("log_namespace") == "muxtwist._signals"]
        self.assertEqual(said, [])
        for call in handlers.calls:
            assert callable(call)
            call()
        formats = [e["log_format"] for e in events if e.get("log_namespace") == "muxtwist._signals"]
        self.assertEqual(
            formats,
            [
                "received signal {signum}: stopping",
                "received signal {signum} again: aborting the remaining connections",
                "received signal {signum} while draining: ignored in a worker",
            ],
        )


class ReloadFailureTests(unittest.SynchronousTestCase):
    """A SIGHUP's reload that fails unexpectedly says so at once."""

    def test_a_reload_that_fails_unexpectedly_is_logged_at_once(self) -> None:
        """A reload failing with something other than a rules-file error is logged at once, with its exception."""
        from twisted.internet import defer
        from twisted.logger import LogLevel, globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        handlers = _Handlers()
        handlers.reload = lambda: defer.fail(RuntimeError("an unexpected fault"))  # type: ignore[method-assign,assignment,return-value]
        handlers._sighup(signal.SIGHUP, None)
        for call in handlers.calls:
            assert callable(call)
            call()
        said = [e for e in events if e.get("log_namespace") == "muxtwist._signals"]
        self.assertEqual([e["log_level"] for e in said], [LogLevel.error])
        self.assertIn("reload failed", said[0]["log_format"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_one_reload_failure_shared_by_two_sighups_is_logged_once(self) -> None:
        """Two SIGHUPs that join one reload (it waited its turn) log its unexpected failure once, not once each."""
        from twisted.internet import defer
        from twisted.logger import LogLevel, globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        from twisted.python.failure import Failure

        handlers = _Handlers()
        waiting: list[defer.Deferred[bool]] = []
        handlers.reload = lambda: waiting.append(defer.Deferred()) or waiting[-1]  # type: ignore[method-assign,assignment,return-value,func-returns-value]
        for _ in range(2):
            handlers._sighup(signal.SIGHUP, None)
            for call in handlers.calls:
                assert callable(call)
                call()
            handlers.calls.clear()
        failure = Failure(RuntimeError("an unexpected fault"))
        for d in waiting:  # as MuxService.reload fires the asks that joined one reload
            d.errback(failure)
        said = [e for e in events if e.get("log_namespace") == "muxtwist._signals"]
        self.assertEqual([e["log_level"] for e in said], [LogLevel.error])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class StopSignalDuringStartUpTests(unittest.SynchronousTestCase):
    """A stop signal the reactor's own handler took before muxtwist's handlers were in."""

    def install(self, handlers: _Handlers) -> list[dict[str, Any]]:
        from twisted.logger import globalLogPublisher

        import muxtwist._signals

        self.patch(muxtwist._signals, "_sighup_pending", False)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.addCleanup(handlers.restore_signals)
        handlers._install_signals()
        return [e for e in events if e.get("log_namespace") == "muxtwist._signals"]

    def test_it_is_taken_as_handled_so_twistd_exits_0(self) -> None:
        """
        The reactor stops already; the signal it noted (twistd kills itself
        with it at exit: status -15) is taken, as muxtwist's own handler
        would have handled it, and said.
        """
        handlers = _Handlers()
        handlers._exitSignal = signal.SIGTERM  # type: ignore[attr-defined]
        said = self.install(handlers)
        self.assertIsNone(handlers._exitSignal)  # type: ignore[attr-defined]
        self.assertEqual(
            [(e["log_format"], e["signum"]) for e in said][:1],
            [("received signal {signum} during start-up: stopping", signal.SIGTERM)],
        )

    def test_a_second_signal_is_one_again_not_a_second_stop(self) -> None:
        """
        A signal to muxtwist's handler before the reactor ran the stop the
        reactor's own handler asked is a second signal: the remaining
        connections are aborted once the services drain, and the reactor is
        not stopped twice (ReactorNotRunning, logged critical).
        """
        handlers = _Handlers()
        triggers: list[tuple[object, ...]] = []
        handlers.addSystemEventTrigger = lambda *a: triggers.append(a)  # type: ignore[attr-defined]
        handlers.stop_now = lambda: None  # type: ignore[attr-defined]
        handlers._exitSignal = signal.SIGTERM  # type: ignore[attr-defined]
        self.install(handlers)
        handlers._stop_signal(signal.SIGTERM, None)
        for call in handlers.calls:
            assert callable(call)
            call()
        self.assertNotIn(handlers.stop, handlers.calls)
        self.assertEqual(triggers, [("before", "shutdown", handlers.stop_now)])  # type: ignore[attr-defined]

    def test_a_signal_while_ours_go_in_takes_the_noted_one_first(self) -> None:
        """
        A signal reaching muxtwist's handler after it is in but before
        _install_signals took the reactor's noted one: that one is taken and
        said there, and this one is a second signal.
        """
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        handlers = _Handlers()
        handlers.addSystemEventTrigger = lambda *a: None  # type: ignore[attr-defined]
        handlers.stop_now = lambda: None  # type: ignore[attr-defined]
        handlers._exitSignal = signal.SIGINT  # type: ignore[attr-defined]
        handlers._stop_signal(signal.SIGTERM, None)
        self.assertIsNone(handlers._exitSignal)  # type: ignore[attr-defined]
        for call in handlers.calls:
            assert callable(call)
            call()
        self.assertNotIn(handlers.stop, handlers.calls)
        said = [(e["log_format"], e["signum"]) for e in events if e.get("log_namespace") == "muxtwist._signals"]
        self.assertEqual(
            said,
            [
                ("received signal {signum} during start-up: stopping", signal.SIGINT),
                ("received signal {signum} again: aborting the remaining connections", signal.SIGTERM),
            ],
        )

    def test_two_signals_before_the_stop_ran_stop_once(self) -> None:
        """Two signals to muxtwist's handler within one reactor iteration: one reactor.stop()."""
        handlers = _Handlers()
        handlers.addSystemEventTrigger = lambda *a: None  # type: ignore[attr-defined]
        handlers.stop_now = lambda: None  # type: ignore[attr-defined]
        self.install(handlers)
        handlers._stop_signal(signal.SIGTERM, None)
        handlers._stop_signal(signal.SIGINT, None)
        self.assertEqual(handlers.calls.count(handlers.stop), 1)
        handlers.restore_signals()
        handlers.arm_signals()
        handlers._stop_signal(signal.SIGTERM, None)
        self.assertEqual(handlers.calls.count(handlers.stop), 2)

    def test_without_one_nothing_is_said(self) -> None:
        """No signal noted by the reactor: nothing taken, nothing said."""
        handlers = _Handlers()
        self.assertEqual(self.install(handlers), [])
        self.assertFalse(hasattr(handlers, "_exitSignal"))
