"""
muxtwist.aio.serve inside asyncio.run, and the targets that need the event
loop (ASGI, asyncio stream protocols). Each test runs a short asyncio
program in a child process (a process has one reactor, and this test
session may run another), which prints one JSON line of what it observed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

from twisted.trial.unittest import TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = """
import asyncio, json, sys
import muxtwist.aio
from muxtwist import Rule
from muxtwist.apps import ASGI, AsyncioProtocol
from muxtwist.matchers import HTTP1, Prefix

async def http_get(port, path, timeout=10):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n".encode())
    data = await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    return data.decode()

def with_lifespan(http, events):
    # An ASGI application: http(scope, receive, send) serves its requests; its
    # lifespan startup completes at once, its shutdown is noted in events.
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            events.append("lifespan shutdown")
            await send({"type": "lifespan.shutdown.complete"})
            return
        await http(scope, receive, send)
    return app

def serve_asgi(app, shutdown_timeout):
    # muxtwist.aio.serve of one ASGI target; the target and the service have the same shutdown_timeout.
    rules = [Rule(HTTP1(), ASGI(app, shutdown_timeout=shutdown_timeout))]
    return muxtwist.aio.serve(rules, "tcp:0:interface=127.0.0.1", shutdown_timeout=shutdown_timeout)
"""


def run_program(case: TestCase, body: str, timeout: float = 90.0) -> dict[str, Any]:
    """Run ``body`` (after PRELUDE) in a child Python; the JSON object of its last output line."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    lines = done.stdout.decode().strip().splitlines()
    case.assertEqual(done.returncode, 0, done.stderr.decode()[-3000:])
    case.assertTrue(lines, done.stderr.decode()[-3000:])
    result: dict[str, Any] = json.loads(lines[-1])
    return result


class ServeTests(TestCase):
    def assert_answered(self, response: str, body: str) -> None:
        """``response`` is a 200 whose body ends with ``body``."""
        self.assertTrue(response.startswith("HTTP/1.1 200"), response)
        self.assertTrue(response.endswith(body), response)

    def test_serve_and_close_drain_a_request_then_run_the_lifespan_shutdown(self) -> None:
        """close() lets an in-flight request finish, then runs the lifespan shutdown; root_path reaches the scope."""
        got = run_program(
            self,
            """
            events = []
            async def app(scope, receive, send):
                if scope["type"] == "lifespan":
                    while True:
                        message = await receive()
                        events.append(message["type"])
                        if message["type"] == "lifespan.startup":
                            await send({"type": "lifespan.startup.complete"})
                        else:
                            await send({"type": "lifespan.shutdown.complete"})
                            return
                events.append("request " + scope["path"] + " " + scope["root_path"])
                await asyncio.sleep(0.3)
                await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
                await send({"type": "http.response.body", "body": b"slow"})
                events.append("responded")

            async def main():
                rules = [Rule(HTTP1(), ASGI(app, root_path="/api"))]
                server = await muxtwist.aio.serve(rules, "tcp:0:interface=127.0.0.1", shutdown_timeout=5)
                events.append("serving")
                request = asyncio.create_task(http_get(server.port, "/slow"))
                while not any(e.startswith("request") for e in events):
                    await asyncio.sleep(0.01)
                await server.close()
                events.append("closed")
                print(json.dumps({"events": events, "response": await request}))

            asyncio.run(main())
            """,
        )
        self.assertEqual(
            got["events"],
            ["lifespan.startup", "serving", "request /api/slow /api", "responded", "lifespan.shutdown", "closed"],
        )
        self.assert_answered(got["response"], "slow")

    def test_close_closes_idle_keep_alive_connections_at_once(self) -> None:
        """close() asks ASGI connections to finish: an idle keep-alive one closes at once, not at shutdown_timeout."""
        got = run_program(
            self,
            """
            import time
            async def app(scope, receive, send):
                if scope["type"] != "http":
                    return
                await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
                await send({"type": "http.response.body", "body": b"ok"})

            async def main():
                rules = [Rule(HTTP1(), ASGI(app, lifespan="off"))]
                server = await muxtwist.aio.serve(rules, "tcp:0:interface=127.0.0.1", shutdown_timeout=30)
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
                head = await asyncio.wait_for(reader.readuntil(b"ok"), 5)
                started = time.monotonic()
                closing = asyncio.create_task(server.close())
                rest = await asyncio.wait_for(reader.read(), 40)
                closed_after = time.monotonic() - started
                await closing
                took = time.monotonic() - started
                print(json.dumps({"head": head.decode(), "rest": rest.decode(),
                                  "closed_after": closed_after, "took": took}))

            asyncio.run(main())
            """,
        )
        self.assertTrue(got["head"].startswith("HTTP/1.1 200"), got["head"])
        self.assertEqual(got["rest"], "")
        # At once: far from the 30 s shutdown_timeout, also on a busy host.
        self.assertLess(got["closed_after"], 10)
        self.assertLess(got["took"], 10)

    def test_close_closes_idle_wsgi_keep_alive_connections_at_once(self) -> None:
        """close() closes an idle keep-alive connection of a WSGI target at once, not at shutdown_timeout."""
        got = run_program(
            self,
            """
            import time

            def app(environ, start_response):
                start_response("200 OK", [("Content-Length", "2")])
                return [b"ok"]

            async def main():
                muxtwist.aio.install_reactor()
                from muxtwist.apps import WSGI  # twisted.web imports the reactor

                rules = [Rule(HTTP1(), WSGI(app))]
                server = await muxtwist.aio.serve(rules, "tcp:0:interface=127.0.0.1", shutdown_timeout=30)
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
                await asyncio.wait_for(reader.readuntil(b"ok"), 5)
                started = time.monotonic()
                closing = asyncio.create_task(server.close())
                rest = await asyncio.wait_for(reader.read(), 40)
                closed_after = time.monotonic() - started
                await closing
                print(json.dumps({"rest": rest.decode(), "closed_after": closed_after}))

            asyncio.run(main())
            """,
        )
        self.assertEqual(got["rest"], "")
        self.assertLess(got["closed_after"], 10)  # at once: far from the 30 s shutdown_timeout

    def test_connections_wait_for_the_lifespan_startup(self) -> None:
        """A request that arrives while the lifespan startup runs is served after it, with its state."""
        got = run_program(
            self,
            """
            import socket
            s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
            async def app(scope, receive, send):
                if scope["type"] == "lifespan":
                    await receive()
                    await asyncio.sleep(0.5)
                    scope["state"]["ready"] = "yes"
                    await send({"type": "lifespan.startup.complete"})
                    await receive()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
                body = scope["state"]["ready"].encode()
                await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"3")]})
                await send({"type": "http.response.body", "body": body})

            async def main():
                rules = [Rule(HTTP1(), ASGI(app))]
                serving = asyncio.create_task(muxtwist.aio.serve(rules, f"tcp:{port}:interface=127.0.0.1"))
                while True:
                    try:
                        response = await http_get(port, "/")
                        break
                    except OSError:
                        await asyncio.sleep(0.01)
                server = await serving
                await server.close()
                print(json.dumps({"response": response}))

            asyncio.run(main())
            """,
        )
        self.assert_answered(got["response"], "yes")

    def test_failed_lifespan_startup_raises_from_serve(self) -> None:
        """An application whose lifespan startup fails makes serve() raise, and nothing keeps listening."""
        got = run_program(
            self,
            """
            async def app(scope, receive, send):
                await receive()
                await send({"type": "lifespan.startup.failed", "message": "no database"})

            async def main():
                try:
                    await muxtwist.aio.serve([Rule(HTTP1(), ASGI(app, lifespan="on"))], "tcp:0:interface=127.0.0.1")
                except RuntimeError as e:
                    print(json.dumps({"error": str(e)}))

            asyncio.run(main())
            """,
        )
        self.assertIn("failed its lifespan startup", got["error"])

    def test_lifespan_shutdown_that_hangs_is_given_up_after_shutdown_timeout(self) -> None:
        """A lifespan shutdown that never completes is abandoned after shutdown_timeout, so close() returns."""
        got = run_program(
            self,
            """
            import time
            from twisted.logger import formatEvent, globalLogPublisher
            events, logged = [], []
            globalLogPublisher.addObserver(lambda e: logged.append((e["log_level"].name, formatEvent(e))))
            async def app(scope, receive, send):
                await receive()
                await send({"type": "lifespan.startup.complete"})
                await receive()
                events.append("shutdown began")
                await asyncio.sleep(3600)

            async def main():
                server = await serve_asgi(app, shutdown_timeout=0.5)
                start = time.monotonic()
                try:
                    await asyncio.wait_for(server.close(), 10)
                    events.append("closed")
                except asyncio.TimeoutError:
                    events.append("close() still waiting after 10 s")
                errors = [m for level, m in logged if level in ("error", "critical")]
                print(json.dumps({"events": events, "seconds": time.monotonic() - start, "errors": errors}))

            asyncio.run(main())
            """,
        )
        self.assertEqual(got["events"], ["shutdown began", "closed"])
        self.assertLess(got["seconds"], 5)
        (error,) = got["errors"]
        self.assertIn("did not finish its lifespan shutdown within 0.5 s", error)

    def test_requests_still_running_at_shutdown_timeout_are_cancelled_before_the_lifespan_shutdown(self) -> None:
        """close() cancels the application's requests it aborted, before the lifespan shutdown runs, as uvicorn does."""
        got = run_program(
            self,
            """
            events = []
            async def forever(scope, receive, send):
                events.append("request")
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    events.append("request cancelled")
                    raise

            async def main():
                server = await serve_asgi(with_lifespan(forever, events), shutdown_timeout=0.3)
                request = asyncio.create_task(http_get(server.port, "/forever"))
                while "request" not in events:
                    await asyncio.sleep(0.01)
                await server.close()
                events.append("closed")
                await asyncio.gather(request, return_exceptions=True)
                left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                print(json.dumps({"events": events, "tasks left": len(left)}))

            asyncio.run(main())
            """,
        )
        self.assertEqual(got["events"], ["request", "request cancelled", "lifespan shutdown", "closed"])
        self.assertEqual(got["tasks left"], 0)

    def test_work_a_request_does_after_its_response_finishes_before_the_lifespan_shutdown(self) -> None:
        """
        close() waits, up to shutdown_timeout, for a request still running
        after its response was sent and its connection closed (a background
        task), as uvicorn does, instead of cancelling it at once.
        """
        got = run_program(
            self,
            """
            events = []
            async def working_after(scope, receive, send):
                await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
                await send({"type": "http.response.body", "body": b"ok"})
                events.append("responded")
                try:
                    await asyncio.sleep(0.5)  # what Starlette's BackgroundTasks do after the response
                except asyncio.CancelledError:
                    events.append("background cancelled")
                    raise
                events.append("background done")

            async def main():
                server = await serve_asgi(with_lifespan(working_after, events), shutdown_timeout=5)
                answer = await http_get(server.port, "/")
                await server.close()
                events.append("closed")
                print(json.dumps({"events": events, "answer": answer.endswith("ok")}))

            asyncio.run(main())
            """,
        )
        self.assertTrue(got["answer"])
        self.assertEqual(got["events"], ["responded", "background done", "lifespan shutdown", "closed"])

    def test_cancelling_serve_during_the_lifespan_startup_still_runs_the_lifespan_shutdown(self) -> None:
        """serve() cancelled during the startup waits for it, then runs the shutdown: no lifespan is left running."""
        got = run_program(
            self,
            """
            import subprocess, os
            events = []
            async def app(scope, receive, send):
                await receive()
                await asyncio.sleep(0.5)
                events.append("started")
                await send({"type": "lifespan.startup.complete"})
                await receive()
                events.append("lifespan shutdown")
                await send({"type": "lifespan.shutdown.complete"})

            async def main():
                serving = asyncio.create_task(serve_asgi(app, shutdown_timeout=5))
                await asyncio.sleep(0.1)
                serving.cancel()
                try:
                    await serving
                    events.append("serve returned")
                except asyncio.CancelledError:
                    events.append("serve cancelled")
                await asyncio.sleep(0.1)
                left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                listening = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
                print(json.dumps({"events": events, "tasks left": len(left),
                                  "listening": f"pid={os.getpid()}," in listening}))

            asyncio.run(main())
            """,
        )
        self.assertEqual(got["events"], ["started", "lifespan shutdown", "serve cancelled"])
        self.assertEqual(got["tasks left"], 0)
        self.assertFalse(got["listening"])

    def test_another_reactor_installed_is_a_clear_error(self) -> None:
        """serve() under an already installed non-asyncio reactor raises AsyncioReactorRequired saying so."""
        got = run_program(
            self,
            """
            from twisted.internet import reactor  # installs the default reactor first

            async def main():
                try:
                    await muxtwist.aio.serve([], "tcp:0:interface=127.0.0.1")
                except muxtwist.aio.AsyncioReactorRequired as e:
                    print(json.dumps({"error": str(e)}))

            asyncio.run(main())
            """,
        )
        self.assertIn("another reactor is already installed", got["error"])
        self.assertIn("install_reactor()", got["error"])

    def test_stream_protocol_echoes_100_mb_to_a_slow_reader_in_bounded_memory(self) -> None:
        """A start_server-style handler echoes 100 MB to a slow reader in bounded memory; half-close ends it."""
        got = run_program(
            self,
            """
            import resource
            TOTAL = 100 * 1024 * 1024

            async def handle(reader, writer):
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    writer.write(data)
                    await writer.drain()
                writer.write(b"bye")
                writer.close()

            def stream_protocol():
                return asyncio.StreamReaderProtocol(asyncio.StreamReader(), handle)

            def peak_mb():
                return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

            async def main():
                server = await muxtwist.aio.serve([Rule(Prefix(b"STREAM"), AsyncioProtocol(stream_protocol))],
                                                  "tcp:0:interface=127.0.0.1")
                before = peak_mb()
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                chunk = b"STREAM" + b"y" * 65530

                async def send():
                    for _ in range(TOTAL // len(chunk)):
                        writer.write(chunk)
                        await writer.drain()
                    writer.write_eof()

                sender = asyncio.create_task(send())
                received = 0
                tail = b""
                while True:
                    data = await asyncio.wait_for(reader.read(65536), 30)
                    if not data:
                        break
                    received += len(data)
                    tail = (tail + data)[-3:]
                    if received % (4 * 1024 * 1024) < 65536:
                        await asyncio.sleep(0.02)  # the slow reader
                await sender
                writer.close()
                await server.close()
                sent = (TOTAL // len(chunk)) * len(chunk)
                print(json.dumps({"sent": sent, "received": received, "tail": tail.decode(),
                                  "growth_mb": peak_mb() - before}))

            asyncio.run(main())
            """,
        )
        self.assertEqual(got["received"], got["sent"] + 3)
        self.assertEqual(got["tail"], "bye")
        # Without flow control the echo side would buffer most of the 100 MB.
        self.assertLess(got["growth_mb"], 40, got)
