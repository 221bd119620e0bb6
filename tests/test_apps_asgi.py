"""
ASGI target pieces that need no running event loop: the clear error under
another reactor, what ``python -m muxtwist check`` says, and how a request
head still coming is told in uvicorn's protocols; and ``header_timeout``
over real sockets, in child asyncio programs. Serving over real sockets is
in tests/test_aio.py and tests/test_apps_examples.py.
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
from tests.test_apps_retiring import ASGIPrograms


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

    def test_header_timeout_is_checked_when_built(self) -> None:
        """ASGI(header_timeout=...) refuses what is not a positive number of seconds or None, naming the option."""
        for bad in (0, -1, float("nan"), float("inf"), 10**400, "30", True):
            with self.assertRaises(OptionError) as caught:
                ASGI(app, header_timeout=bad)  # type: ignore[arg-type]
            self.assertEqual((caught.exception.owner, caught.exception.option), ("ASGI", "header_timeout"))
            self.assertIn("a positive number of seconds or None", str(caught.exception))
        self.assertEqual(ASGI(app).header_timeout, 30.0)
        self.assertEqual(ASGI(app, header_timeout=2).header_timeout, 2.0)
        self.assertIsNone(ASGI(app, header_timeout=None).header_timeout)

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


#: What the header_timeout programs add (after ``ASGI_RELOAD``): the
#: request-head deadlines the reactor holds, and the report of what the
#: client saw.
HEADER_TIMEOUT = """
def head_deadlines():
    from twisted.internet import reactor
    return sum(getattr(call.func, "__name__", "") == "_head_timed_out" for call in reactor.getDelayedCalls())

async def report(server, writer, answer, closed_after, deadlines=None):
    deadlines = head_deadlines() if deadlines is None else deadlines
    writer.close()
    await server.close()
    tell(answer=answer, closed_after=closed_after, deadlines=deadlines)

async def report_rest(server, reader, writer, seconds=3):
    # What the server sends until it closes (or for seconds), reported.
    answer, closed_after = await rest(reader, seconds)
    await report(server, writer, answer, closed_after)
"""


class ASGIHeaderTimeoutTests(ASGIPrograms):
    """
    A request's head that does not come in full within ``header_timeout``
    seconds of its first byte gets 408 (child asyncio programs, the asyncio
    reactor there), with uvicorn's h11 protocol.
    """

    http = "h11"
    helpers = HEADER_TIMEOUT

    def assert_timed_out(self, got: dict[str, Any]) -> None:
        """The client got 408 with Connection: close, then EOF, about header_timeout (0.5 s) later."""
        self.assertTrue(got["answer"].startswith("HTTP/1.1 408 Request Timeout\r\n"), got)
        self.assertIn("\r\nConnection: close\r\n", got["answer"])
        self.assertIsNotNone(got["closed_after"], f"still open 3 s later: {got}")
        self.assertGreater(got["closed_after"], 0.4, got)
        self.assertLess(got["closed_after"], 1.5, got)
        self.assertEqual(got["deadlines"], 0, got)

    def assert_second_timed_out(self, got: dict[str, Any]) -> None:
        """The connection's first request reached the application, its second got 408 and EOF (assert_timed_out)."""
        self.assert_timed_out(got)
        self.assertEqual(got["events"].count("request app"), 1)

    def test_a_partial_head_gets_408_then_eof_at_header_timeout(self) -> None:
        """A request line and a header line, then nothing: 408 and EOF about header_timeout later."""
        got = self.run_asgi(
            """
            async def main():
                server, reader, writer = await served(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n", header_timeout=0.5)
                await report_rest(server, reader, writer)
            """
        )
        self.assert_timed_out(got)
        self.assertNotIn("request app", got["events"])

    def test_a_head_dribbled_a_byte_at_a_time_gets_408_at_header_timeout(self) -> None:
        """A byte of a header every 0.2 s does not extend the deadline: 408 about header_timeout after the first."""
        got = self.run_asgi(
            """
            async def dribble(writer):
                for _ in range(15):
                    await asyncio.sleep(0.2)
                    if writer.is_closing():
                        return
                    writer.write(b"x")

            async def main():
                server, reader, writer = await served(b"GET / HTTP/1.1\\r\\nX-Slow: ", header_timeout=0.5)
                dribbling = asyncio.ensure_future(dribble(writer))
                answer, closed_after = await rest(reader)
                dribbling.cancel()
                await report(server, writer, answer, closed_after)
            """
        )
        self.assert_timed_out(got)

    def test_a_head_sent_in_pieces_within_the_deadline_is_answered(self) -> None:
        """A head in three pieces within header_timeout is answered, and its deadline is cancelled."""
        got = self.run_asgi(
            """
            async def main():
                server, reader, writer = await served(b"GET / HTTP/1.1\\r\\n", header_timeout=0.5)
                await asyncio.sleep(0.1)
                writer.write(b"Host: x\\r\\n")
                await asyncio.sleep(0.1)
                writer.write(b"\\r\\n")
                answer = (await asyncio.wait_for(reader.readuntil(b"app"), 5)).decode()
                deadlines = head_deadlines()
                more, closed_after = await rest(reader, 1.0)
                await report(server, writer, answer + more, closed_after, deadlines)
            """
        )
        self.assertTrue(got["answer"].startswith("HTTP/1.1 200 OK\r\n"), got)
        self.assertTrue(got["answer"].endswith("\r\n\r\napp"), got)
        self.assertIsNone(got["closed_after"], got)
        self.assertEqual(got["deadlines"], 0, got)

    def test_a_second_request_on_a_keep_alive_connection_has_its_own_deadline(self) -> None:
        """After a first request answered, a second whose head stops coming gets 408 about header_timeout later."""
        got = self.run_asgi(
            """
            async def main():
                server, reader, writer = await served(GET, header_timeout=0.5)
                await asyncio.wait_for(reader.readuntil(b"app"), 5)
                more, closed_after = await rest(reader, 0.6)  # idle between requests: no deadline then
                assert (more, closed_after) == ("", None), (more, closed_after)
                writer.write(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n")
                await report_rest(server, reader, writer)
            """
        )
        self.assert_second_timed_out(got)

    def test_a_partial_head_pipelined_behind_a_request_gets_408(self) -> None:
        """A request and the start of a second in one write: the first is answered, the second gets 408 and EOF."""
        got = self.run_asgi(
            """
            async def main():
                server, reader, writer = await served(GET + b"GET /2 HTTP/1.1\\r\\nHost: x\\r\\n", header_timeout=0.5)
                await asyncio.wait_for(reader.readuntil(b"app"), 5)
                await report_rest(server, reader, writer)
            """
        )
        self.assert_second_timed_out(got)

    def test_a_partial_head_behind_a_response_longer_than_header_timeout_gets_408_after_it(self) -> None:
        """
        A partial head pipelined behind a request answered after 1.2 s, longer
        than header_timeout (0.5 s): its deadline passes while that response
        is still to come (a 408 cannot interrupt it) and is looked at again
        until it has been sent; the head then gets 408 and EOF within
        header_timeout of that response's end, not never.
        """
        got = self.run_asgi(
            """
            async def slow(scope, receive, send):
                if scope["type"] != "http":
                    return
                events.append("request app")
                await asyncio.sleep(1.2)
                await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
                await send({"type": "http.response.body", "body": b"slow"})

            async def main():
                server = listen(ASGI(slow, lifespan="off", header_timeout=0.5, http=HTTP, timeout_keep_alive=60))
                await server.started()
                reader, writer = await connected(server, GET + b"GET /2 HTTP/1.1\\r\\nHost: x\\r\\n")
                await asyncio.wait_for(reader.readuntil(b"slow"), 5)
                await report_rest(server, reader, writer)
            """
        )
        self.assertTrue(got["answer"].startswith("HTTP/1.1 408 Request Timeout\r\n"), got)
        self.assertIn("\r\nConnection: close\r\n", got["answer"])
        self.assertIsNotNone(got["closed_after"], f"still open 3 s after the first response: {got}")
        self.assertLess(got["closed_after"], 1.5, got)  # about the 0.3 s left of the deadline; room for a busy host
        self.assertEqual(got["deadlines"], 0, got)
        self.assertEqual(got["events"].count("request app"), 1, got)

    def test_no_header_timeout_leaves_a_partial_head_waiting(self) -> None:
        """header_timeout=None: a partial head is neither answered nor closed, and no deadline is set."""
        got = self.run_asgi(
            """
            async def main():
                server, reader, writer = await served(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n", header_timeout=None)
                await report_rest(server, reader, writer, 1.0)
            """
        )
        self.assertEqual((got["answer"], got["closed_after"], got["deadlines"]), ("", None, 0), got)


class ASGIHeaderTimeoutHttpToolsTests(ASGIHeaderTimeoutTests):
    """The same with uvicorn's httptools protocol (what it picks when httptools is installed)."""

    http = "httptools"
    skip = None if importlib.util.find_spec("httptools") else "httptools is not installed (pip install -e '.[test]')"
