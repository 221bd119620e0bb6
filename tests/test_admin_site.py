"""
The admin site on a real listening port on 127.0.0.1: its paths and
methods, and its bound on open connections (clients holding connections
cannot use up the process's descriptors; idle ones, and ones sending a
request too slowly, give way to new ones).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from muxtwist._admin_site import SLOW_REQUEST
from muxtwist.admin import admin_site

#: Seconds any one step of these tests may take.
STEP = 5.0

#: The leaf paths of the admin site.
LEAVES = [
    "/",
    "/status.json",
    "/metrics",
    "/ready",
    "/stats.css",
    "/stats.js",
    "/worker/metrics",
    "/worker/status.json",
]


class Holder(Protocol):
    """A client that keeps what it reads and tells when the server closes it."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        if not self.closed.called:
            self.closed.callback(None)


class Forever(Resource):
    """A resource whose answer never comes: its connection is answering a request."""

    isLeaf = True

    def render_GET(self, request: Request) -> int:
        return NOT_DONE_YET


def request(method: str, path: str) -> bytes:
    """An HTTP/1.1 request of ``path`` with no body, after which the server closes the connection."""
    return f"{method} {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()


def head(response: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """The status code, headers (lower-case names) and body of one HTTP/1.1 response."""
    top, _, body = response.partition(b"\r\n\r\n")
    status, *lines = top.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(status.split()[1]), headers, body


class SiteCase(unittest.TestCase):
    """A real port serving an admin site; clients closed at the end."""

    def serve(self, **kwargs: Any) -> None:
        self.site = admin_site(**kwargs)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(self.port.stopListening)
        self.clients: list[Holder] = []

    def tearDown(self) -> defer.Deferred[Any]:
        waits = []
        for client in getattr(self, "clients", []):
            if client.transport is not None:
                client.transport.abortConnection()  # type: ignore[attr-defined]
            waits.append(client.closed)
        return defer.DeferredList(waits)

    async def connect(self) -> Holder:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port, timeout=STEP)
        client = Holder()
        self.clients.append(client)
        await connectProtocol(endpoint, client).addTimeout(STEP, reactor)
        return client

    async def ask(self, request: bytes) -> bytes:
        """Everything the site answers ``request`` on a new connection, once the site closes it."""
        client = await self.connect()
        client.transport.write(request)  # type: ignore[union-attr]
        await client.closed.addTimeout(STEP, reactor)
        return client.received

    async def answer(self, client: Holder, path: str) -> bytes:
        """The answer to a keep-alive GET of ``path`` on ``client``'s connection (bounded by STEP)."""
        client.received = b""
        client.transport.write(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())  # type: ignore[union-attr]
        for _ in range(int(STEP / 0.01)):
            top, _, body = client.received.partition(b"\r\n\r\n")
            length = head(client.received)[1].get(b"content-length") if top else None
            if length is not None and len(body) >= int(length):
                return client.received
            await deferLater(reactor, 0.01)  # type: ignore[arg-type]
        self.fail(f"no answer to {path}: {client.received!r}")

    async def until_ready(self, client: Holder) -> None:
        """Until ``client`` has read the end of /ready's answer (bounded by STEP)."""
        for _ in range(int(STEP / 0.01)):
            if client.received.endswith(b"ready\n"):
                return
            await deferLater(reactor, 0.01)  # type: ignore[arg-type]
        self.fail(f"no answer from /ready: {client.received!r}")

    async def wait_open(self, n: int, idle: int | None = None) -> None:
        """Until the site holds ``n`` connections, ``idle`` of them idle if given (bounded by STEP)."""
        site: Any = self.site
        for _ in range(int(STEP / 0.01)):
            if site.open_connections == n and idle in (None, site.idle_connections):
                return
            await deferLater(reactor, 0.01)  # type: ignore[arg-type]
        self.fail(
            f"the site holds {site.open_connections} connections ({site.idle_connections} idle), not {n} ({idle})"
        )


class AdminPathsAndMethodsTests(SiteCase):
    def setUp(self) -> None:
        self.serve()

    async def test_paths_below_a_resource_are_not_found(self) -> None:
        """A path below a leaf (/ready/x, /ready/) and /worker itself are 404, whatever the method."""
        for path in ["/worker", "/worker/", "/nope"] + [p + s for p in LEAVES if p != "/" for s in ("/x", "/")]:
            for method in ("GET", "POST"):
                answer = await self.ask(request(method, path))
                self.assertEqual(head(answer)[0], 404, (method, path, answer[:200]))

    async def test_leaves_answer_get_and_head(self) -> None:
        """Each leaf answers GET with 200 and a body, and HEAD with 200 and none."""
        for path in LEAVES:
            code, _, body = head(await self.ask(request("GET", path)))
            self.assertEqual((code, bool(body)), (200, True), path)
            code, _, body = head(await self.ask(request("HEAD", path)))
            self.assertEqual((code, body), (200, b""), path)

    async def test_other_methods_answer_405_with_allow(self) -> None:
        """POST, PUT, DELETE, PATCH and an unknown method answer 405 with Allow: GET, HEAD on every leaf."""
        for path in LEAVES:
            for method in ("POST", "PUT", "DELETE", "PATCH", "BREW"):
                code, headers, _ = head(await self.ask(request(method, path)))
                self.assertEqual((code, headers.get(b"allow")), (405, b"GET, HEAD"), (method, path))

    async def test_options_answers_204_with_allow_and_keeps_the_connection(self) -> None:
        """OPTIONS answers 204 with Allow: GET, HEAD and no Content-Length, and the connection serves on."""
        for path in LEAVES:
            client = await self.connect()
            client.transport.write(  # type: ignore[union-attr]
                f"OPTIONS {path} HTTP/1.1\r\nHost: a\r\n\r\nGET /ready HTTP/1.1\r\nHost: a\r\n\r\n".encode()
            )
            await self.until_ready(client)
            options, _, ready = client.received.partition(b"\r\n\r\n")
            code, headers, _ = head(options + b"\r\n\r\n")
            self.assertEqual((code, headers.get(b"allow")), (204, b"GET, HEAD"), path)
            self.assertNotIn(b"content-length", headers)
            self.assertEqual(head(ready)[0], 200)


class AdminConnectionLimitTests(SiteCase):
    def setUp(self) -> None:
        self.clock = Clock()
        # The site's clock is a Clock (SLOW_REQUEST, timeouts); its port and clients are real.
        self.serve(max_connections=3, reactor=self.clock)
        self.site.resource.putChild(b"forever", Forever())

    async def sending(self) -> Holder:
        """A connection that sent part of a request."""
        client = await self.connect()
        client.transport.write(b"GET /ready HTTP/1.1\r\nHo")  # type: ignore[union-attr]
        return client

    async def test_a_new_connection_takes_the_place_of_the_one_idle_the_longest(self) -> None:
        """Past max_connections a new connection closes the one idle the longest (since its last answer)."""
        first, second, third = [await self.connect() for _ in range(3)]
        await self.wait_open(3, idle=3)
        self.assertEqual(head(await self.answer(first, "/ready"))[0], 200)  # first is now the last to become idle
        answer = await self.ask(request("GET", "/ready"))
        self.assertEqual(head(answer)[:1], (200,))
        await second.closed.addTimeout(STEP, reactor)
        self.assertEqual(second.received, b"")
        for kept in (first, third):
            self.assertEqual(head(await self.answer(kept, "/ready"))[0], 200)
        self.assertEqual(self.site.open_connections, 2)  # type: ignore[attr-defined]

    async def test_connections_sending_requests_are_kept_and_the_site_answers_once_one_leaves(self) -> None:
        """While every held connection is sending its request, a new one is closed at once; one leaving makes room."""
        held = [await self.sending() for _ in range(3)]
        await self.wait_open(3, idle=0)
        extra = await self.connect()
        await extra.closed.addTimeout(STEP, reactor)
        self.assertEqual(extra.received, b"")
        self.assertFalse(any(c.closed.called for c in held))
        held[0].transport.loseConnection()  # type: ignore[union-attr]
        await held[0].closed.addTimeout(STEP, reactor)
        await self.wait_open(2)
        answer = await self.ask(request("GET", "/ready"))
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:80])
        self.assertTrue(answer.endswith(b"ready\n"))

    async def test_a_request_sent_too_slowly_gives_way_but_one_being_answered_never(self) -> None:
        """After SLOW_REQUEST a connection still sending its request gives way; one being answered is kept."""
        answering = await self.connect()
        answering.transport.write(b"GET /forever HTTP/1.1\r\nHost: a\r\n\r\n")  # type: ignore[union-attr]
        await self.wait_open(1, idle=0)
        self.clock.advance(SLOW_REQUEST + 1)  # the answering one is as old as can be
        slow = await self.sending()
        await self.wait_open(2, idle=0)
        slower = await self.sending()
        await self.wait_open(3, idle=0)
        self.clock.advance(SLOW_REQUEST - 1)
        early = await self.connect()
        await early.closed.addTimeout(STEP, reactor)
        self.assertEqual(early.received, b"")
        self.clock.advance(2)
        answer = await self.ask(request("GET", "/ready"))
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:80])
        await slow.closed.addTimeout(STEP, reactor)
        self.assertFalse(answering.closed.called or slower.closed.called)
        slower.transport.write(b"st: a\r\n\r\n")  # type: ignore[union-attr]
        await self.until_ready(slower)
        self.assertTrue(slower.received.startswith(b"HTTP/1.1 200 "), slower.received[:80])

    def test_bad_limits_are_refused(self) -> None:
        """A max_connections that is not a positive integer is refused with a clear error."""
        for bad in (0, -1, 1.5, True, "10"):
            with self.assertRaises(ValueError):
                admin_site(max_connections=bad)  # type: ignore[arg-type]
