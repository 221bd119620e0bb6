"""
Signal handling shared by the services that own a process: SIGHUP reloads,
SIGTERM and SIGINT stop the reactor (so services drain and the process
exits 0 instead of dying by the signal).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

__all__ = ["SignalHandlers"]

log = Logger()


class SignalHandlers:
    """
    Mixin for a service with ``running``, ``_reactor`` and ``reload()``:
    :meth:`arm_signals` from ``startService``, :meth:`restore_signals` from
    ``stopService``.
    """

    running: int
    _reactor: Any
    _old_handlers: dict[int, Any]
    reload: Callable[[], object]

    def arm_signals(self) -> None:
        """Install the handlers once the reactor runs (it installs its own when it starts; ours go after)."""
        self._old_handlers = getattr(self, "_old_handlers", {})
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

    def restore_signals(self) -> None:
        """Put back the handlers that were there before."""
        for signum, handler in getattr(self, "_old_handlers", {}).items():
            signal.signal(signum, handler)
        self._old_handlers = {}

    def _sighup(self, signum: int, frame: Any) -> None:
        # Signal handlers run between bytecodes; do the work in the reactor.
        self._reactor.callFromThread(self.reload)

    def _stop_signal(self, signum: int, frame: Any) -> None:
        if not self.running:
            # Already stopping: a second signal cuts the drain short.
            stop_now = getattr(self, "stop_now", None)
            if stop_now is not None:
                log.info("received signal {signum} again: aborting the remaining connections", signum=signum)
                self._reactor.callFromThread(stop_now)
            return
        log.info("received signal {signum}: stopping", signum=signum)
        self._reactor.callFromThread(self._reactor.stop)
