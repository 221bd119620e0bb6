"""
Signal handling shared by the services that own a process: SIGHUP reloads,
SIGTERM and SIGINT stop the reactor (so services drain and the process
exits 0 instead of dying by the signal).
"""

from __future__ import annotations

import atexit
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from muxtwist._twisted import take_exit_signal

__all__ = ["SignalHandlers", "hold_sighup", "keep_our_handlers", "take_pending_sighup"]

log = Logger()

#: A SIGHUP that arrived before the services' own handlers were in.
_sighup_pending = False

#: Whether :func:`_ignore_sighup_at_exit` is registered with atexit.
_exit_hook = False


def _hold(signum: int, frame: Any) -> None:
    global _sighup_pending
    _sighup_pending = True


def hold_sighup() -> None:
    """
    From now until :class:`SignalHandlers` installs its handlers, a SIGHUP is
    remembered (and acted on then) instead of killing the process, which is
    what SIGHUP's default action does. Call it first thing in start-up
    (``twistd``'s option parsing), before anything slow. A SIGHUP that was
    blocked until now (a ``--workers`` parent starts its workers with SIGHUP
    blocked) is delivered here. A handler someone else installed is left alone;
    the one ``_muxtwist_startup`` installed while the interpreter started (an
    installed package's ``.pth`` hook) is taken over.
    """
    global _exit_hook
    current = signal.getsignal(signal.SIGHUP)
    early: Any = sys.modules.get("_muxtwist_startup")
    if current in (signal.SIG_DFL, signal.SIG_IGN, None) or (early is not None and current is early._held):
        signal.signal(signal.SIGHUP, _hold)
    if not _exit_hook:
        atexit.register(_ignore_sighup_at_exit)
        _exit_hook = True
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


def _call_now(f: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    f(*args, **kwargs)


def _ignore_sighup_at_exit() -> None:
    """
    At exit, a SIGHUP still held (by :func:`hold_sighup`, or by the early
    hold, as after a failed start or once the services have given their
    handlers back) becomes ignored: the interpreter puts SIGHUP's default
    action back before the process ends, and a SIGHUP then would replace
    the exit status (1 for a failed start, 0 for a clean stop) by death by signal.
    """
    current = signal.getsignal(signal.SIGHUP)
    early: Any = sys.modules.get("_muxtwist_startup")
    if current is _hold or (early is not None and current is early._held):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def take_pending_sighup() -> bool:
    """Whether a SIGHUP was held since :func:`hold_sighup`; forgets it."""
    global _sighup_pending
    pending, _sighup_pending = _sighup_pending, False
    early: Any = sys.modules.get("_muxtwist_startup")
    if early is not None and early.pending:
        pending, early.pending = True, 0
    return pending


def _ours(handler: object) -> bool:
    """Whether ``handler`` is one muxtwist installed: a :class:`SignalHandlers`' or a start-up hold."""
    early: Any = sys.modules.get("_muxtwist_startup")
    if handler is _hold or (early is not None and handler is early._held):
        return True
    return isinstance(getattr(handler, "__self__", None), SignalHandlers)


@contextmanager
def keep_our_handlers(path: str) -> Iterator[None]:
    """
    Run a rules file (``path``) inside: muxtwist's SIGHUP, SIGTERM and SIGINT
    handlers stay in while it runs (``signal.signal`` leaves them be, so a
    signal arriving meanwhile is muxtwist's), and any the file replaces all the
    same are put back, with one warning. A file
    runs again at each reload, so its own SIGHUP handler would otherwise end
    reloading after the first one. Handlers that are not muxtwist's (none
    installed yet, or an embedding program's) are the file's to change.
    """
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    ours = {s for s, h in before.items() if _ours(h)}
    kept: set[int] = set()
    real = signal.signal
    loading = True

    def guarded(signalnum: int | signal.Signals, handler: signal._HANDLER) -> signal._HANDLER:
        # While the file runs, muxtwist's handlers stay in: a signal arriving
        # then (a SIGHUP storm's next one, a SIGTERM) is muxtwist's, not the
        # file's (which may be SIG_DFL, death, or one that raises).
        if loading and signalnum in ours and threading.current_thread() is threading.main_thread():
            kept.add(signalnum)
            return signal.getsignal(signalnum)
        return real(signalnum, handler)

    if ours and threading.current_thread() is threading.main_thread():
        signal.signal = guarded
    try:
        yield
    finally:
        loading = False
        if signal.signal is guarded:
            signal.signal = real
        replaced = [s for s, h in before.items() if _ours(h) and (s in kept or signal.getsignal(s) != h)]
        # Only the main thread may set handlers (a rules file loaded elsewhere cannot have set them either).
        if replaced and threading.current_thread() is threading.main_thread():
            for signum in replaced:
                signal.signal(signum, before[signum])
            log.warn(
                "{path} replaced muxtwist's handler for {signals}: muxtwist's is back"
                " (the file runs again at every reload; leave these signals to muxtwist)",
                path=path,
                signals=", ".join(signal.Signals(s).name for s in replaced),
            )


class SignalHandlers:
    """
    Mixin for a service with ``running``, ``_reactor`` and ``reload()``:
    :meth:`arm_signals` from ``startService``, :meth:`restore_signals` from
    ``stopService``.
    """

    running: int
    _reactor: Any
    _old_handlers: dict[int, Any]
    _reload_queued: bool
    _stop_asked: bool
    reload: Callable[[], object]

    def arm_signals(self) -> None:
        """Install the handlers once the reactor runs (it installs its own when it starts; ours go after)."""
        self._old_handlers = getattr(self, "_old_handlers", {})
        self._stop_asked = False
        if getattr(self._reactor, "running", False):
            self._install_signals()
        else:
            self._reactor.addSystemEventTrigger("after", "startup", self._install_signals)

    def _install_signals(self) -> None:
        if not self.running or self._old_handlers:
            return
        for signum, handler in (
            (signal.SIGHUP, self._sighup),
            (signal.SIGTERM, self._stop_signal),
            (signal.SIGINT, self._stop_signal),
        ):
            self._old_handlers[signum] = signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        self._take_start_up_stop(_call_now)
        if take_pending_sighup():
            log.info("a SIGHUP arrived during start-up: reloading now")
            self._reload_queued = True
            self._reactor.callLater(0, self._queued_reload)

    def _take_start_up_stop(self, say: Callable[..., object]) -> None:
        """
        A stop signal that came between the reactor's handlers and ours: the
        reactor stops already; taken as handled (as after ours, the process
        exits 0: twistd would otherwise kill itself with that signal at
        exit) and said, through ``say(log.info, ...)``.
        """
        taken = take_exit_signal(self._reactor)
        if taken is not None:
            self._stop_asked = True
            say(log.info, "received signal {signum} during start-up: stopping", signum=taken)

    def restore_signals(self) -> None:
        """Put back the handlers that were there before."""
        for signum, handler in getattr(self, "_old_handlers", {}).items():
            signal.signal(signum, handler)
        self._old_handlers = {}

    def _sighup(self, signum: int, frame: Any) -> None:
        # Signal handlers run between bytecodes; do the work in the reactor.
        # SIGHUPs that arrive while a reload is still waiting to run are one
        # reload: a burst of signals does not queue a burst of reloads.
        if getattr(self, "_reload_queued", False):
            return
        self._reload_queued = True
        self._reactor.callFromThread(self._queued_reload)

    def _queued_reload(self) -> object:
        self._reload_queued = False
        result = self.reload()
        if isinstance(result, Deferred):
            # Nobody else waits for a signal's reload: a failure that is not a
            # rules-file error (those are logged by reload itself) is said now,
            # not when the garbage collector finds the Deferred, if ever.
            result.addErrback(self._reload_failed)
        return result

    def _reload_failed(self, failure: Failure) -> None:
        # SIGHUPs that joined one reload waiting its turn get its one Failure: say it once.
        if failure is not getattr(self, "_failure_said", None):
            self._failure_said = failure
            log.failure("reload failed unexpectedly", failure, LogLevel.error)

    def _stop_signal(self, signum: int, frame: Any) -> None:
        # Logged from the reactor too: a handler runs between any two
        # bytecodes, perhaps in the middle of an observer's write (a file's
        # buffer refuses a reentrant write; a worker's pipe to its parent
        # holds a lock).
        say = self._reactor.callFromThread
        # One the reactor's own handler took before ours were in, that
        # _install_signals has not taken yet (this one came meanwhile).
        self._take_start_up_stop(say)
        # A stop asked already (by a signal before, perhaps the reactor's own
        # handler during start-up) whose services have not begun stopping yet:
        # this is a second signal too, not a second reactor.stop() (which
        # raises ReactorNotRunning).
        if not self.running or getattr(self, "_stop_asked", False):
            if getattr(self, "in_worker", False):
                # A --workers worker: the parent signals it once; a signal to
                # every process (systemd's KillMode=control-group) must not
                # make that a second one. The parent decides when to stop waiting.
                say(log.info, "received signal {signum} while draining: ignored in a worker", signum=signum)
                return
            # Already stopping: a second signal cuts the drain short.
            stop_now = getattr(self, "stop_now", None)
            if stop_now is not None:
                say(log.info, "received signal {signum} again: aborting the remaining connections", signum=signum)
                if self.running:
                    # The services stop from the first 'before shutdown'
                    # triggers (twistd's): abort once they have begun draining.
                    say(self._reactor.addSystemEventTrigger, "before", "shutdown", stop_now)
                else:
                    say(stop_now)
            return
        self._stop_asked = True
        say(log.info, "received signal {signum}: stopping", signum=signum)
        self._reactor.callFromThread(self._reactor.stop)
