"""A ``MuxService`` of a rules file the test writes and rewrites, for the reload tests."""

from __future__ import annotations

import os
from typing import Any, ClassVar

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from muxtwist.config import load_config
from muxtwist.service import MuxService


class RulesFileCase(unittest.TestCase):
    """
    A service of a rules file: ``TEMPLATE`` with ``{entries}`` (one
    ``ENTRY`` per listener ``{description}``) and ``{word}``.
    """

    TEMPLATE: ClassVar[str]
    ENTRY: ClassVar[str]
    #: the service's shutdown_timeout (``None``: its default).
    SHUTDOWN_TIMEOUT: ClassVar[float | None] = None

    def write(self, descriptions: str | tuple[str, ...], word: str) -> None:
        """The rules file now: these listeners, answering ``word``."""
        if isinstance(descriptions, str):
            descriptions = (descriptions,)
        entries = ", ".join(self.ENTRY.format(description=d) for d in descriptions)
        with open(self.path, "w") as f:
            f.write(self.TEMPLATE.format(entries=entries, word=word))

    def start(self, *descriptions: str) -> MuxService:
        """A running service of a new rules file of ``descriptions``, answering ``one``; stopped at the end."""
        self.path = os.path.abspath(self.mktemp() + "-rules.py")
        self.write(descriptions, "one")
        options: dict[str, Any] = {}
        if self.SHUTDOWN_TIMEOUT is not None:
            options["shutdown_timeout"] = self.SHUTDOWN_TIMEOUT
        service = MuxService(config_path=self.path, **options)
        service.load(load_config(self.path))
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    def log_events(self) -> list[dict[str, Any]]:
        """The events logged from now on, until the test ends."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def log_lines(self) -> list[str]:
        """The lines logged from now on, until the test ends, as text."""
        lines: list[str] = []

        def keep(event: dict[str, Any]) -> None:
            lines.append(formatEvent(event))

        globalLogPublisher.addObserver(keep)
        self.addCleanup(globalLogPublisher.removeObserver, keep)
        return lines
