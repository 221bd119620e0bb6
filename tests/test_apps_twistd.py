"""
A rules.py that serves a Flask application through ``WSGI`` and asyncio
protocols through ``AsyncioProtocol``, loaded by a real ``twistd muxtwist``
(the asyncio reactor and the default one) and reached with curl and nc;
``python -m muxtwist check`` and ``explain`` describe its targets.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from twisted.trial.unittest import TestCase

from tests.test_apps_examples import TWISTD_ASYNCIO
from tests.test_examples import CLIENT, ROOT, Running, nc
from tests.twistd import free_port

RULES = '''\
"""An ASGI app, Flask through WSGI, an asyncio echo protocol and an asyncio stream protocol on one port."""

import asyncio

from flask import Flask, request

from muxtwist import Rule
from muxtwist.apps import ASGI, WSGI, AsyncioProtocol
from muxtwist.matchers import HTTP1, Prefix

web = Flask("web")


@web.route("/hello")
def hello():
    return "hello from flask\\n"


@web.route("/upper", methods=["POST"])
def upper():
    return request.get_data().upper()


class Echo(asyncio.Protocol):
    """Every byte back; closes after the client's half-close."""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        self.transport.close()


async def shout(reader, writer):
    while line := await reader.readline():
        writer.write(line.upper())
        await writer.drain()
    writer.close()


def shouting():
    return asyncio.StreamReaderProtocol(asyncio.StreamReader(), shout)


async def asgi_app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello from asgi\\n"})


rules = [
    Rule(HTTP1(path="/asgi"), ASGI(asgi_app), name="asgi"),
    Rule(HTTP1(), WSGI(web, threads=4), name="flask"),
    Rule(Prefix(b"ECHO"), AsyncioProtocol(Echo), name="echo"),
    Rule(Prefix(b"SHOUT"), AsyncioProtocol(shouting), name="shout"),
]
'''

ASGI_RULE = '    Rule(HTTP1(path="/asgi"), ASGI(asgi_app), name="asgi"),\n'
TWISTD_DEFAULT = [arg for arg in TWISTD_ASYNCIO if arg != "--reactor=asyncio"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m muxtwist ARGS`` from this checkout."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, "-m", "muxtwist", *args], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT
    )


class WebStackRulesFileTests(TestCase):
    def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.rules = os.path.join(directory, "rules.py")
        with open(self.rules, "w") as f:
            f.write(RULES)

    def serve(self, command: list[str], rules: str | None = None) -> tuple[Running, int]:
        running = Running([*command, "--port", "tcp:0:interface=127.0.0.1", "--config", rules or self.rules])
        self.addCleanup(running.kill)
        (port,) = running.listening_ports()
        return running, port

    def curl(self, port: int, path: str, *args: str) -> bytes:
        done = subprocess.run(
            ["curl", "-sS", "--fail", "--max-time", str(CLIENT), *args, f"http://127.0.0.1:{port}{path}"],
            capture_output=True,
            timeout=CLIENT + 5,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout

    def test_check_and_explain_describe_the_targets(self) -> None:
        """check lists the WSGI and AsyncioProtocol targets; explain names the one each client's bytes reach."""
        done = cli("check", self.rules)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("flask: HTTP1() -> WSGI(web, threads=4)", done.stdout)
        self.assertIn("echo: Prefix(prefixes=b'ECHO') -> AsyncioProtocol('Echo')", done.stdout)
        self.assertIn("shout: Prefix(prefixes=b'SHOUT') -> AsyncioProtocol('shouting')", done.stdout)
        done = cli("explain", self.rules, "GET /hello HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("winner: flask -> WSGI(web, threads=4)", done.stdout)
        done = cli("explain", self.rules, "ECHO hi")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("winner: echo -> AsyncioProtocol('Echo')", done.stdout)

    def test_wsgi_and_asyncio_protocols_under_twistd_on_the_asyncio_reactor(self) -> None:
        """Under twistd --reactor=asyncio, curl reaches Flask, nc the echo and the stream protocol; SIGTERM exits 0."""
        running, port = self.serve(TWISTD_ASYNCIO)
        running.wait_for(rb"AsyncioSelectorReactor")
        self.assertEqual(self.curl(port, "/hello"), b"hello from flask\n")
        self.assertEqual(self.curl(port, "/upper", "--data-binary", "quiet words"), b"QUIET WORDS")
        # nc -N half-closes after its input: the echo sends everything back, then closes.
        self.assertEqual(nc(port, b"ECHO one\n" + b"x" * 100_000), b"ECHO one\n" + b"x" * 100_000)
        self.assertEqual(nc(port, b"SHOUT one\nand two\n"), b"SHOUT ONE\nAND TWO\n")
        for rule in (rb"flask", rb"echo", rb"shout"):
            running.wait_for(rb"rule " + rule)
        self.assertEqual(running.stop(), 0, running.output.decode(errors="replace"))

    def serve_without_asgi(self) -> tuple[Running, int]:
        """twistd on its default reactor, with the rules but the ASGI one."""
        # ASGI needs the asyncio reactor (tests/test_apps_asgi.py checks the error): not in this file.
        without_asgi = os.path.join(os.path.dirname(self.rules), "without_asgi.py")
        with open(without_asgi, "w") as f:
            f.write(RULES.replace(ASGI_RULE, ""))
        return self.serve(TWISTD_DEFAULT, without_asgi)

    def test_wsgi_and_a_plain_asyncio_protocol_under_twistd_on_the_default_reactor(self) -> None:
        """Under twistd's default reactor, curl reaches Flask and nc the echo protocol (it never touches the loop)."""
        running, port = self.serve_without_asgi()
        self.assertEqual(self.curl(port, "/hello"), b"hello from flask\n")
        self.assertEqual(nc(port, b"ECHO one\ntwo\n"), b"ECHO one\ntwo\n")
        self.assertEqual(running.stop(), 0, running.output.decode(errors="replace"))
        self.assertNotIn(b"AsyncioSelectorReactor", running.output)

    def test_sigterm_closes_an_idle_keep_alive_wsgi_connection_at_once(self) -> None:
        """
        SIGTERM asks the WSGI target's connections to finish (at the reactor's
        shutdown): a keep-alive client idle after its answer gets EOF and
        twistd exits at once, not after the 30 s shutdown_timeout.
        """
        running, port = self.serve_without_asgi()
        with socket.create_connection(("127.0.0.1", port), CLIENT) as client:
            client.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"hello from flask\n"):
                chunk = client.recv(65536)
                self.assertTrue(chunk, f"closed after {answer!r}")
                answer += chunk
            started = time.monotonic()
            self.assertEqual(running.stop(timeout=20), 0, running.output.decode(errors="replace"))
            self.assertLess(time.monotonic() - started, 10, running.output.decode(errors="replace"))
            self.assertEqual(client.recv(65536), b"")  # EOF, not a reset at shutdown_timeout

    def test_workers_run_the_reactor_twistd_was_given(self) -> None:
        """twistd --reactor=asyncio muxtwist --workers 2 starts workers on the asyncio reactor: ASGI answers in each."""
        port = free_port()
        running = Running(
            [*TWISTD_ASYNCIO, "--port", f"tcp:{port}:interface=127.0.0.1", "--workers", "2", "--config", self.rules]
        )
        self.addCleanup(running.kill)
        running.wait_for(rb"SniffingFactory starting on", count=2)
        # New connections spread over both workers; each must serve the ASGI rule.
        for _ in range(6):
            self.assertEqual(self.curl(port, "/asgi"), b"hello from asgi\n")
        self.assertEqual(self.curl(port, "/hello"), b"hello from flask\n")
        self.assertEqual(running.stop(), 0, running.output.decode(errors="replace"))
