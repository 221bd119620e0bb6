"""
ASGI target pieces that need no event loop: the clear error under another
reactor, and what ``python -m muxtwist check`` says. Serving over real
sockets is in tests/test_aio.py and tests/test_apps_examples.py.
"""

from __future__ import annotations

import io
import os
import tempfile

from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from muxtwist.apps import ASGI, AsyncioReactorRequired
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
