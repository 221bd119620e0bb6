"""
The examples of the web-stack recipes, run as real processes with real
clients: examples/fastapi (twistd on the asyncio reactor, FastAPI next to a
real sshd and redis-server) and examples/asyncio_embed (asyncio.run).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from typing import Any

from twisted.trial.unittest import TestCase

from tests.test_examples import CLIENT, Running, curl
from tests.test_proxy_real import start_redis, start_sshd

TWISTD_ASYNCIO = [
    sys.executable,
    "-c",
    "from twisted.scripts.twistd import run; run()",
    "-n",
    "--pidfile=",
    "--reactor=asyncio",
    "muxtwist",
]


def in_thread(function: Any) -> Any:
    """Run ``function()`` on a thread of its own (asyncio clients need a loop of their own) and return its result."""
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(function())
        except BaseException as e:
            error.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(CLIENT * 3)
    if thread.is_alive():
        raise AssertionError("client thread did not finish in time")
    if error:
        raise error[0]
    return result[0]


def websocket_echo(port: int, messages: list[str]) -> list[str]:
    """Send ``messages`` with the websockets client library; the replies."""
    import websockets

    async def talk() -> list[str]:
        replies = []
        async with websockets.connect(f"ws://127.0.0.1:{port}/echo", open_timeout=CLIENT) as ws:
            for m in messages:
                await ws.send(m)
                replies.append(str(await asyncio.wait_for(ws.recv(), CLIENT)))
        return replies

    return asyncio.run(talk())


def run_client(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, capture_output=True, timeout=CLIENT + 5, stdin=subprocess.DEVNULL)


class FastAPIRecipeTests(TestCase):
    """examples/fastapi: FastAPI, SSH and Redis on one port under twistd --reactor=asyncio."""

    async def test_fastapi_ssh_and_redis_on_one_port(self) -> None:
        """curl and a websockets client reach the app, ssh-keyscan sshd, redis-cli redis; lifespan runs and ends."""
        redis = await start_redis(self)
        sshd, host_key = await start_sshd(self)
        running = Running(
            [*TWISTD_ASYNCIO, "--port", "tcp:0:interface=127.0.0.1", "--config", "examples/fastapi/rules.py"],
            {"REDIS_PORT": str(redis), "SSHD_PORT": str(sshd)},
        )
        self.addCleanup(running.kill)
        running.wait_for(rb"AsyncioSelectorReactor")
        (port,) = running.listening_ports()
        running.wait_for(rb"webapp lifespan startup")

        self.assertEqual(json.loads(curl(port, "/hello/muxtwist")), {"message": "hello muxtwist"})
        streamed = run_client(
            ["curl", "-sS", "-N", "--fail", "--max-time", str(CLIENT), f"http://127.0.0.1:{port}/count?to=50"]
        )
        self.assertEqual(streamed.stdout.decode(), "".join(f"{i}\n" for i in range(1, 51)), streamed.stderr)
        # HTTP/1.1 keep-alive: two requests on one connection.
        both = run_client(
            [
                "curl",
                "-sS",
                "--fail",
                "--max-time",
                str(CLIENT),
                "-w",
                "%{num_connects}\n",
                f"http://127.0.0.1:{port}/hello/a",
                f"http://127.0.0.1:{port}/hello/b",
            ]
        )
        self.assertEqual(both.stdout.decode().count("hello"), 2, both.stderr)
        # -w prints the new connections each transfer made: the second reused the first's.
        self.assertEqual([line[-1:] for line in both.stdout.decode().split("\n")[:2]], ["1", "0"], both.stdout)

        replies = in_thread(lambda: websocket_echo(port, ["one", "two", "three"]))
        self.assertEqual(replies, ["echo: one", "echo: two", "echo: three"])

        done = run_client(["redis-cli", "-p", str(port), "SET", "muxtwist", "asgi"])
        self.assertEqual((done.returncode, done.stdout), (0, b"OK\n"), done.stderr)
        self.assertEqual(run_client(["redis-cli", "-p", str(port), "GET", "muxtwist"]).stdout, b"asgi\n")
        done = run_client(["ssh-keyscan", "-T", str(int(CLIENT)), "-t", "ed25519", "-p", str(port), "127.0.0.1"])
        self.assertIn(host_key.encode(), done.stdout, done.stderr)

        for rule in (rb"web", rb"redis", rb"on_timeout"):
            running.wait_for(rb"rule " + rule)
        self.assertEqual(running.stop(), 0, running.output.decode(errors="replace"))
        self.assertIn(b"webapp lifespan shutdown", running.output)
        self.assertLess(
            running.output.index(b"webapp lifespan startup"), running.output.index(b"webapp lifespan shutdown")
        )


class AsyncioEmbedRecipeTests(TestCase):
    """examples/asyncio_embed: muxtwist inside asyncio.run, next to the program's own task."""

    def test_curl_and_a_line_client_then_sigterm(self) -> None:
        """curl reaches the ASGI app, a half-closing client the stream protocol; SIGTERM closes and exits 0."""
        running = Running([sys.executable, "examples/asyncio_embed/main.py", "tcp:0:interface=127.0.0.1"])
        self.addCleanup(running.kill)
        (match,) = running.wait_for(rb"serving on port (\d+)")
        port = int(match.group(1))
        self.assertRegex(curl(port), r"^ticks so far: \d+\n$")
        done = subprocess.run(
            ["nc", "-N", "127.0.0.1", str(port)],
            input=b"ECHO one\nand two\n",
            capture_output=True,
            timeout=CLIENT + 5,
        )
        self.assertEqual(done.stdout, b"ECHO ONE\nAND TWO\n", done.stderr)
        self.assertEqual(running.stop(), 0, running.output.decode(errors="replace"))
        self.assertIn(b"closed", running.output)
