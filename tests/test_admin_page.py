"""
The admin stats page in a real headless browser (Debian's chromium, driven
through chromedriver's WebDriver protocol), loaded from a real ``twistd
muxtwist`` while connections are live; and the page's escaping and
``/status.json`` in memory.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from muxtwist.admin import admin_site, merge_status, render_page, status
from muxtwist.default import Echo
from muxtwist.matchers import Prefix
from muxtwist.metrics import Metrics
from muxtwist.sniffing import Rule, SniffingFactory
from muxtwist.testing import MemoryConnection
from muxtwist.workers import worker_command
from tests.processes import stop_group

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
#: Where to keep the screenshot the browser test takes (docs/stats-page.png
#: is made with MUXTWIST_STATS_SCREENSHOT=docs/stats-page.png).
SCREENSHOT_ENV = "MUXTWIST_STATS_SCREENSHOT"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,720",
]

HOSTILE = "<img src=x onerror=alert(1)>"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something true, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class Process:
    """
    A child process in its own session (so its children go with it); the
    output goes to a file in a temporary directory, read by ``output``.
    """

    def __init__(self, command: list[str], log_path: str, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, **(env or {})),
            start_new_session=True,
        )

    @property
    def output(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def wait(self, timeout: float) -> int:
        """The exit code, or kill the whole group and fail after ``timeout`` seconds."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"process did not exit in {timeout}s:\n{self.output[-3000:]}") from None

    def kill(self) -> None:
        """Stop the process and everything left in its process group (TERM, then KILL)."""
        stop_group(self.proc)
        self._log.close()


def twistd(tmp: str, *args: str) -> Process:
    """
    ``twistd -n muxtwist ARGS`` from this checkout, in its own session, with
    its temporary files (a --workers pool's sockets) in ``tmp`` too, so that
    a process killed outright leaves nothing in the system's /tmp.
    """
    return Process(worker_command(args), os.path.join(tmp, "twistd.log"), env={"TMPDIR": tmp})


class EchoBackend:
    """A real TCP echo server on 127.0.0.1, in threads."""

    def __init__(self) -> None:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                while data := self.request.recv(65536):
                    self.request.sendall(data)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port: int = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class WebDriver:
    """Just enough of the W3C WebDriver protocol to drive chromium through chromedriver."""

    def __init__(self, tmp: str) -> None:
        assert CHROMIUM is not None and CHROMEDRIVER is not None
        self.port = free_port()
        self.driver = Process(
            [CHROMEDRIVER, f"--port={self.port}", "--allowed-ips=127.0.0.1"], os.path.join(tmp, "chromedriver.log")
        )
        try:
            wait_for_port(self.port, self.driver.proc)
            profile = tempfile.mkdtemp(dir=tmp, prefix="chromium-profile-")
            options = {"binary": CHROMIUM, "args": [*CHROMIUM_ARGS, f"--user-data-dir={profile}"]}
            answer = self._call(
                "POST",
                "/session",
                {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}},
            )
            self.session = answer["sessionId"]
        except BaseException:
            self.driver.kill()
            raise

    def _call(self, method: str, path: str, body: object = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"WebDriver {method} {path}: {e.read()[:2000]!r}") from None

    def get(self, url: str) -> None:
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def run(self, script: str) -> Any:
        """Run ``script`` (a function body) in the page and return its result."""
        return self._call("POST", f"/session/{self.session}/execute/sync", {"script": script, "args": []})

    def screenshot(self) -> bytes:
        return base64.b64decode(self._call("GET", f"/session/{self.session}/screenshot"))

    def quit(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self.driver.kill()


RULES = """\
from twisted.internet.protocol import Factory

from muxtwist import Rule
from muxtwist.actions import HealthCheck, Proxy
from muxtwist.default import Echo
from muxtwist.matchers import Any, Prefix

check = HealthCheck(interval=0.5, timeout=1.0, rise=1, fall=1)
rules = [
    Rule(
        Prefix(b"RELAY"),
        Proxy(
            ["tcp:host=127.0.0.1:port={good}", "tcp:host=127.0.0.1:port={dead}"],
            balance="first",
            health_check=check,
        ),
        name="relay",
    ),
    Rule(Prefix(b"<"), Factory.forProtocol(Echo), name={hostile!r}),
    Rule(Any(), Factory.forProtocol(Echo), name="echo"),
]
shutdown_timeout = 2.0
"""

#: The page's tables as the browser renders them: rule name -> [live, total,
#: bytes in, bytes out, outcomes], backend -> [health, live, total, ...].
READ_PAGE = """
const rows = {};
for (const tr of document.querySelectorAll("main tr.rule")) {
  rows[tr.cells[0].textContent] = Array.from(tr.cells).slice(1).map(c => c.textContent);
}
const backends = {};
for (const tr of document.querySelectorAll("main tr.backend")) {
  backends[tr.cells[1].textContent] = Array.from(tr.cells).slice(2).map(c => c.textContent);
}
return {
  rows: rows,
  backends: backends,
  images: document.querySelectorAll("img").length,
  updated: document.getElementById("updated").textContent,
  title: document.title,
};
"""


def hold(port: int, first: bytes, count: int) -> list[socket.socket]:
    """Open ``count`` connections that send ``first`` and get it echoed back, and keep them open."""
    held = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(first)
        got = b""
        while len(got) < len(first):
            chunk = s.recv(4096)
            if not chunk:
                raise AssertionError(f"closed after {got!r}")
            got += chunk
        held.append(s)
    return held


class BrowserTests(unittest.TestCase):
    """The stats page of a real ``twistd muxtwist --admin``, read by headless chromium."""

    def setUp(self) -> None:
        if CHROMIUM is None or CHROMEDRIVER is None:
            raise unittest.SkipTest(
                "chromium and chromedriver are not installed (apt-get install chromium chromium-driver; .ci/run does)"
            )

    def test_stats_page_shows_live_connections_and_backend_health(self) -> None:
        """Headless chromium shows live connections per rule, backend health and escaped names, refreshing itself."""
        tmp = tempfile.mkdtemp(prefix="muxtwist-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        backend = EchoBackend()
        self.addCleanup(backend.stop)
        rules = os.path.join(tmp, "rules.py")
        with open(rules, "w") as f:
            f.write(RULES.format(good=backend.port, dead=free_port(), hostile=HOSTILE))
        port, admin = free_port(), free_port()
        server = twistd(
            tmp,
            "--config",
            rules,
            "--port",
            f"tcp:{port}:interface=127.0.0.1",
            "--admin",
            f"tcp:{admin}:interface=127.0.0.1",
        )
        self.addCleanup(server.kill)
        wait_for_port(port, server.proc)
        wait_for_port(admin, server.proc)
        sockets = hold(port, b"RELAY one\n", 3) + hold(port, b"<b>\n", 1) + hold(port, b"plain\n", 2)
        self.addCleanup(lambda: [s.close() for s in sockets])

        browser = WebDriver(tmp)
        self.addCleanup(browser.quit)
        browser.get(f"http://127.0.0.1:{admin}/")

        def dead_is_down() -> Any:
            page = browser.run(READ_PAGE)
            dead = [v for k, v in page["backends"].items() if k != f"tcp:host=127.0.0.1:port={backend.port}"]
            return page if dead and dead[0][0].startswith("DOWN") else None

        page = until(dead_is_down, 20, "the page to show the dead backend DOWN")
        self.assertEqual(page["title"], "muxtwist stats")
        self.assertEqual(page["images"], 0, "a rule name was rendered as markup")
        self.assertEqual(page["rows"]["relay"][0], "3", page)
        self.assertEqual(page["rows"][HOSTILE][0], "1", page)
        self.assertEqual(page["rows"]["echo"][0], "2", page)
        self.assertNotEqual(page["rows"]["relay"][2], "0 B", "the relay's bytes in")
        good = page["backends"][f"tcp:host=127.0.0.1:port={backend.port}"]
        self.assertTrue(good[0].startswith("UP"), good)
        self.assertIn("last check passed", good[0])
        self.assertEqual(good[1], "3", good)
        (dead,) = [v for k, v in page["backends"].items() if "port=" + str(backend.port) not in k]
        self.assertIn("last check", dead[0])
        self.assertRegex(dead[0], r"DOWN for \d+s")

        # More connections, one ended: the page shows them without being reloaded.
        sockets += hold(port, b"RELAY two\n", 2)
        sockets.pop(3).close()
        browser.run("document.body.dataset.marker = 'same page';")

        def refreshed() -> Any:
            page = browser.run(READ_PAGE)
            return page if page["rows"]["relay"][0] == "5" and page["rows"][HOSTILE][0] == "0" else None

        page = until(refreshed, 15, "the page to refresh itself")
        self.assertTrue(page["updated"].startswith("updated "), page["updated"])
        self.assertEqual(browser.run("return document.body.dataset.marker;"), "same page")
        self.assertIn("handed_off", page["rows"][HOSTILE][4])

        png = browser.screenshot()
        self.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
        target = os.environ.get(SCREENSHOT_ENV)
        if target:
            with open(target, "wb") as f:
                f.write(png)


class PageTests(unittest.SynchronousTestCase):
    """The page and /status.json in memory."""

    def test_every_value_is_escaped(self) -> None:
        """Rule names, endpoints, backends and check results with markup are shown as text, never as markup."""
        evil = "<script>alert(1)</script>"
        data = {
            "time": 100.0,
            "workers": [{"slot": None, "pid": 1, "answered": True}],
            "listeners": [
                {
                    "endpoint": f"tcp:{evil}",
                    "live": 1,
                    "sniffing": 0,
                    "total": 1,
                    "bytes_in": 0,
                    "bytes_out": 0,
                    "outcomes": {evil: 1},
                    "rules": [
                        {"name": evil, "live": 1, "total": 1, "bytes_in": 1, "bytes_out": 1, "outcomes": {evil: 1}}
                    ],
                    "backends": [
                        {
                            "rule": evil,
                            "backend": evil,
                            "live": 0,
                            "total": 0,
                            "bytes_in": 0,
                            "bytes_out": 0,
                            "failures": 1,
                            "errors": {evil: 1},
                            "checked": True,
                            "healthy": False,
                            "since": 90.0,
                            "last_check": evil,
                            "last_check_at": 99.0,
                            "skipped_until": None,
                        }
                    ],
                }
            ],
            "limit_rejections": {evil: 0},
        }
        page = render_page(data).decode()
        self.assertNotIn("<script>alert", page)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", page)
        self.assertIn("DOWN for 10s", page)

    def test_control_characters_are_shown_as_escapes(self) -> None:
        """Control characters, ESC and bidi overrides in names are shown as visible escapes; a backslash stays one."""
        name = "relay\x01\x1b[31m\u202eevil\x7f"
        data = {
            "time": 100.0,
            "workers": [{"slot": None, "pid": 1, "answered": True}],
            "listeners": [
                {
                    "endpoint": "tcp6:3000:interface=\\:\\:1\x00",
                    "live": 0,
                    "sniffing": 0,
                    "total": 1,
                    "bytes_in": 0,
                    "bytes_out": 0,
                    "outcomes": {"handed_off": 1},
                    "rules": [{"name": name, "live": 0, "total": 1, "bytes_in": 1, "bytes_out": 1, "outcomes": {}}],
                    "backends": [],
                }
            ],
            "limit_rejections": {},
        }
        page = render_page(data).decode()
        self.assertEqual([c for c in page if not c.isprintable() and c != "\n"], [])
        self.assertIn("relay\\x01\\x1b[31m\\u202eevil\\x7f", page)
        self.assertIn(r"tcp6:3000:interface=\:\:1\x00", page)

    def test_status_counts_rules_bytes_and_outcomes(self) -> None:
        """status() gives each rule's live and total connections, bytes each way and outcomes."""
        clock, metrics = Clock(), Metrics()
        factory = SniffingFactory(
            [Rule(Prefix(b"E"), Factory.forProtocol(Echo), name="e")], reactor=clock, metrics=metrics
        )
        factory.doStart()
        self.addCleanup(factory.doStop)
        first = MemoryConnection(factory, clock=clock)
        first.send(b"E1")
        second = MemoryConnection(factory, clock=clock)
        second.send(b"E234")
        second.close()
        data = status(None, metrics, clock)
        (listener,) = data["listeners"]
        rule = next(r for r in listener["rules"] if r["name"] == "e")
        self.assertEqual((rule["live"], rule["total"]), (1, 2))
        self.assertEqual(rule["outcomes"], {"handed_off": 1})
        self.assertEqual((rule["bytes_in"], rule["bytes_out"]), (4, 0))
        self.assertEqual(listener["live"], 1)
        json.dumps(data)  # what /status.json serves

    def test_merge_sums_workers(self) -> None:
        """merge_status() sums two workers' counts and a backend is UP only when every worker sees it up."""

        def part(pid: int, live: int, healthy: bool) -> dict[str, Any]:
            backend = {
                "rule": "r",
                "backend": "b",
                "live": live,
                "total": live,
                "bytes_in": 10,
                "bytes_out": 20,
                "failures": 0,
                "errors": {},
                "checked": True,
                "healthy": healthy,
                "since": float(pid),
                "last_check": "passed",
                "last_check_at": float(pid),
                "skipped_until": None,
            }
            rule = {"name": "r", "live": live, "total": live, "bytes_in": 1, "bytes_out": 2, "outcomes": {"x": 1}}
            listener = {"endpoint": "tcp:1", "live": live, "sniffing": 0, "total": live, "bytes_in": 1}
            listener.update(bytes_out=2, outcomes={"x": 1}, rules=[rule], backends=[backend])
            return {"workers": [{"slot": pid, "pid": pid}], "listeners": [listener], "limit_rejections": {"emfile": 1}}

        merged = merge_status([part(1, 2, True), part(2, 3, False)], now=10.0)
        (listener,) = merged["listeners"]
        self.assertEqual(listener["live"], 5)
        self.assertEqual(listener["rules"][0]["outcomes"], {"x": 2})
        (backend,) = listener["backends"]
        self.assertEqual((backend["live"], backend["bytes_in"], backend["healthy"]), (5, 20, False))
        self.assertEqual(merged["limit_rejections"], {"emfile": 2})
        self.assertIn("healthy in 1 of 2 workers", render_page(merged).decode())

    def test_site_serves_page_json_and_assets(self) -> None:
        """admin_site() serves the page (scripts only from itself), /status.json and the page's script and style."""
        site = admin_site(registry=Metrics())

        def get(path: bytes) -> DummyRequest:
            request = DummyRequest([path])
            resource = site.getResourceFor(request)
            body = resource.render(request)
            if isinstance(body, bytes):
                request.write(body)
            return request

        page = get(b"")
        self.assertIn(b'<main id="stats">', b"".join(page.written))
        self.assertIn(b"script-src 'self'", page.responseHeaders.getRawHeaders(b"content-security-policy")[0])
        self.assertIn("listeners", json.loads(b"".join(get(b"status.json").written)))
        self.assertIn(b"DOMParser", b"".join(get(b"stats.js").written))
        self.assertIn(b"table", b"".join(get(b"stats.css").written))


class WorkerPeersTests(unittest.TestCase):
    """The aggregating admin site asks every worker of the pool through real UNIX sockets."""

    def peers_directory(self) -> str:
        directory = tempfile.mkdtemp(prefix="muxtwist-test-peers-")
        self.addCleanup(shutil.rmtree, directory, True)
        return directory

    def serve_worker(self, directory: str, slot: int) -> None:
        from twisted.internet import reactor

        site = admin_site(registry=Metrics())
        port = reactor.listenUNIX(os.path.join(directory, f"worker-{slot}.sock"), site)  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)

    async def test_a_worker_whose_socket_is_gone_shows_as_not_answering(self) -> None:
        """A pool of 2 whose worker 0 is being restarted (no socket yet) shows slot 0 as not answering, not 1 of 1."""
        from muxtwist.admin import StatusResource, WorkerPeers

        directory = self.peers_directory()
        self.serve_worker(directory, 1)
        peers = WorkerPeers(directory, expected=lambda: 2)
        resource = StatusResource(None, Metrics(), peers)
        merged = await resource.gathered_status()
        shown = sorted((w["slot"], w["answered"]) for w in merged["workers"])
        self.assertEqual(shown, [(0, False), (1, True)])
        self.assertIn("1 of 2 workers answered", render_page(merged).decode())

    async def test_odd_names_in_the_directory_are_not_workers(self) -> None:
        """Files in the workers' directory not named worker-<number>.sock are left alone; the workers still answer."""
        from muxtwist.admin import StatusResource, WorkerPeers

        directory = self.peers_directory()
        self.serve_worker(directory, 0)
        for odd in ("worker-é.sock", "worker-0#x.sock", "worker-.sock", "worker-1 2.sock"):
            with open(os.path.join(directory, odd), "w"):
                pass
        peers = WorkerPeers(directory)
        self.assertEqual(peers.names(), ["worker-0"])
        merged = await StatusResource(None, Metrics(), peers).gathered_status()
        self.assertEqual([(w["slot"], w["answered"]) for w in merged["workers"]], [(0, True)])

    def test_a_directory_others_can_write_is_not_trusted(self) -> None:
        """A workers' directory that other users can write to (say MUXTWIST_WORKERS_DIR=/tmp) yields no workers."""
        from muxtwist.admin import WorkerPeers

        directory = self.peers_directory()
        self.serve_worker(directory, 0)
        self.assertEqual(WorkerPeers(directory).names(), ["worker-0"])
        os.chmod(directory, 0o1777)
        self.assertEqual(WorkerPeers(directory).names(), [])
        self.assertEqual(WorkerPeers(directory, expected=lambda: 2).names(), [])

    async def test_summed_counters_never_go_back_when_a_worker_dies_or_restarts(self) -> None:
        """What a worker counted stays in the summed /metrics while it is gone and after its replacement starts at 0."""
        from twisted.internet import reactor

        from muxtwist.admin import MetricsResource, WorkerPeers

        directory = self.peers_directory()
        sockets = {}
        for slot, n in ((0, 5), (1, 3)):
            metrics = Metrics()
            for _ in range(n):
                metrics.limit_rejected("emfile")
            path = os.path.join(directory, f"worker-{slot}.sock")
            sockets[slot] = reactor.listenUNIX(path, admin_site(registry=metrics))  # type: ignore[attr-defined]
            self.addCleanup(sockets[slot].stopListening)
        resource = MetricsResource(Metrics(), WorkerPeers(directory, expected=lambda: 2))

        async def emfile() -> float:
            text = (await resource.scrape()).decode()
            return sample(text, 'muxtwist_limit_rejections_total{limit="emfile"}')

        self.assertEqual(await emfile(), 8)
        await sockets[0].stopListening()  # worker 0 dies: its 5 stay counted
        self.assertEqual(await emfile(), 8)
        fresh = Metrics()
        fresh.limit_rejected("emfile")
        restarted = reactor.listenUNIX(os.path.join(directory, "worker-0.sock"), admin_site(registry=fresh))  # type: ignore[attr-defined]
        self.addCleanup(restarted.stopListening)
        self.assertEqual(await emfile(), 9)  # the new worker 0 counts from 0, on top of the old one's 5
        self.assertEqual(await emfile(), 9)

    def test_a_process_that_is_no_worker_serves_its_own_numbers(self) -> None:
        """An admin site in a process that inherited MUXTWIST_WORKERS_DIR but is no worker serves its own numbers."""
        from muxtwist.admin import WORKERS_DIR_ENV

        directory = self.peers_directory()
        self.serve_worker(directory, 0)  # another pool's worker
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "MUXTWIST_WORKER"})
        os.environ[WORKERS_DIR_ENV] = directory
        metrics = Metrics()
        metrics.limit_rejected("emfile")
        request = DummyRequest([b"metrics"])
        site = admin_site(registry=metrics)
        body = site.getResourceFor(request).render(request)
        self.assertIsInstance(body, bytes)
        self.assertIn(b'muxtwist_limit_rejections_total{limit="emfile"} 1.0', body)

    async def test_concurrent_scrapes_ask_each_worker_once(self) -> None:
        """Scrapes that arrive while the workers are being asked share that answer: 20 at once cost each worker one."""
        from twisted.internet import defer, reactor
        from twisted.web.server import Site

        from muxtwist.admin import MetricsResource, StatusResource, WorkerPeers

        directory = self.peers_directory()
        asked: list[object] = []

        class Counting(Site):
            def buildProtocol(self, addr: object) -> object:
                asked.append(addr)
                return super().buildProtocol(addr)

        metrics = Metrics()
        metrics.limit_rejected("emfile")
        worker = Counting(admin_site(registry=metrics).resource)
        port = reactor.listenUNIX(os.path.join(directory, "worker-0.sock"), worker)  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        peers = WorkerPeers(directory, expected=lambda: 1)
        resource = MetricsResource(Metrics(), peers)
        texts = await defer.gatherResults([resource.scrape() for _ in range(20)])
        self.assertEqual(len(asked), 1)
        self.assertEqual({sample(t.decode(), 'muxtwist_limit_rejections_total{limit="emfile"}') for t in texts}, {1})
        status = StatusResource(None, Metrics(), peers)
        answers = await defer.gatherResults([status.gathered_status() for _ in range(20)])
        self.assertEqual(len(asked), 2)
        self.assertEqual({len(a["workers"]) for a in answers}, {1})
        # Once answered, the next scrape asks again.
        await resource.scrape()
        self.assertEqual(len(asked), 3)


def sample(metrics: str, line_start: str) -> float:
    """The value of the one sample whose line starts with ``line_start``."""
    (line,) = [line for line in metrics.splitlines() if line.startswith(line_start + " ")]
    return float(line.rsplit(" ", 1)[1])
