"""
ASGI target pieces that need no running event loop: the clear error under
another reactor, what ``python -m muxtwist check`` says, and how a request
head still coming is told in uvicorn's protocols. Serving over real
sockets is in tests/test_aio.py and tests/test_apps_examples.py.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import os
import tempfile
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from muxtwist._options import OptionError
from muxtwist.apps import ASGI, AsyncioReactorRequired
from muxtwist.apps._asgi import _request_head_coming
from muxtwist.cli import main


async def app(scope: object, receive: object, send: object) -> None:
    """An ASGI application that is never called."""


class ASGITargetTests(unittest.TestCase):
    def test_start_under_another_reactor_says_which_reactor_is_needed(self) -> None:
        """Starting an ASGI target under a non-asyncio reactor raises AsyncioReactorRequired naming the option."""
        # A reactor of its own, so that the test runs whichever reactor the session has installed.
        target = ASGI(app, reactor=MemoryReactorClock())
        with self.assertRaises(AsyncioReactorRequired) as caught:
            target.doStart()
        self.assertIn("--reactor=asyncio", str(caught.exception))
        self.assertIn("MemoryReactorClock", str(caught.exception))
        self.assertEqual(target.connections, 0)

    def test_bad_lifespan_setting_is_a_clear_error(self) -> None:
        """ASGI(app, lifespan=...) accepts only auto, on and off."""
        with self.assertRaises(ValueError):
            ASGI(app, lifespan="sometimes")  # type: ignore[arg-type]

    def test_shutdown_timeout_is_checked_when_built(self) -> None:
        """ASGI(shutdown_timeout=...) refuses what is not a positive number of seconds, naming the option."""
        for bad in (0, -1, float("nan"), float("inf"), 10**400, "30", True, None):
            with self.assertRaises(OptionError) as caught:
                ASGI(app, shutdown_timeout=bad)  # type: ignore[arg-type]
            self.assertEqual((caught.exception.owner, caught.exception.option), ("ASGI", "shutdown_timeout"))
            self.assertIn("a positive number of seconds", str(caught.exception))
        self.assertEqual(ASGI(app, shutdown_timeout=0.5).shutdown_timeout, 0.5)

    def test_numeric_uvicorn_options_are_checked_when_built(self) -> None:
        """Numeric uvicorn options the connections use are refused when built if they cannot work."""
        for name, bad in [
            ("timeout_keep_alive", "5"),
            ("timeout_keep_alive", -1),
            ("timeout_keep_alive", None),
            ("ws_ping_interval", float("nan")),
            ("ws_ping_timeout", float("inf")),
            ("ws_max_size", 1.5),
            ("ws_max_queue", 0),
            ("limit_concurrency", True),
            ("h11_max_incomplete_event_size", -10),
        ]:
            with self.assertRaises(OptionError) as caught:
                ASGI(app, **{name: bad})
            self.assertEqual(caught.exception.option, name)
        target = ASGI(app, timeout_keep_alive=2, ws_ping_interval=None, limit_concurrency=None, ws_max_size=1024)
        self.assertEqual((target.config.timeout_keep_alive, target.config.ws_max_size), (2, 1024))

    def test_check_names_the_target_and_the_reactor_it_needs(self) -> None:
        """python -m muxtwist check shows the ASGI target and that it needs the asyncio reactor."""
        folder = tempfile.mkdtemp()
        self.addCleanup(lambda: [os.unlink(os.path.join(folder, f)) for f in os.listdir(folder)] and os.rmdir(folder))
        path = os.path.join(folder, "rules.py")
        with open(path, "w") as f:
            f.write(
                "from muxtwist import Rule\nfrom muxtwist.apps import ASGI\nfrom muxtwist.matchers import HTTP1\n"
                "async def api(scope, receive, send): pass\n"
                "rules = [Rule(HTTP1(), ASGI(api, root_path='/api'))]\n"
            )
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(main(["check", path], out=out, err=err), 0, err.getvalue())
        self.assertIn("ASGI(api, root_path='/api', lifespan='auto')", out.getvalue())
        self.assertIn("needs Twisted's asyncio reactor", out.getvalue())


class _Transport(asyncio.Transport):
    """All a uvicorn protocol asks of its transport before a request's head is whole."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class RequestHeadComingTests(unittest.TestCase):
    """
    ``_request_head_coming`` on uvicorn's own protocol classes, fed in
    memory (no request completes, so no task is started).
    """

    def head_coming_after(self, http: str, chunks: list[bytes]) -> list[bool]:
        """Whether a head is coming on a new connection of ``http``'s class, then after each chunk."""
        loop = asyncio.new_event_loop()
        self.addCleanup(loop.close)
        target = ASGI(app, http=http)
        target.config.load()
        from uvicorn.server import ServerState

        proto = target.config.http_protocol_class(
            config=target.config, server_state=ServerState(), app_state={}, _loop=loop
        )
        proto.connection_made(_Transport())
        seen = [_request_head_coming(proto)]
        for chunk in chunks:
            proto.data_received(chunk)
            seen.append(_request_head_coming(proto))
        return seen

    def check(self, http: str) -> None:
        chunks = [b"G", b"ET / HTTP/1.1\r\n", b"Host: x\r\n"]
        self.assertEqual(self.head_coming_after(http, chunks), [False, True, True, True])

    def test_h11(self) -> None:
        """With h11's protocol, a head is coming from a request's first byte until its blank line."""
        self.check("h11")

    def test_httptools(self) -> None:
        """With httptools' protocol, a head is coming from a request's first byte until its blank line."""
        if importlib.util.find_spec("httptools") is None:
            raise unittest.SkipTest("httptools is not installed (pip install -e '.[test]')")
        self.check("httptools")

    def test_other_protocols(self) -> None:
        """A protocol class it does not know never has a head coming (uvicorn's own shutdown finishes it)."""

        class Lookalike:
            conn = parser = object()
            scope: dict[str, object] = {}
            cycle = None

        self.assertFalse(_request_head_coming(object()))
        self.assertFalse(_request_head_coming(Lookalike()))
