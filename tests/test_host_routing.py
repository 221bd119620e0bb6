"""
HTTP Host routing: the host a rule sees is the host the server behind it
serves, or the rule does not match. Checked on the matcher alone, and with a
twisted.web name-based virtual host and nginx behind ``SniffingFactory`` on
loopback; and ``RedirectToHTTPS`` builds no Location a client can steer off
the host.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web.server import Site
from twisted.web.static import Data
from twisted.web.vhost import NameVirtualHost
from zope.interface import provider

from muxtwist import Rule
from muxtwist.actions import Proxy, Reject
from muxtwist.interfaces import ConnectionInfo, Verdict
from muxtwist.matchers import HTTP1, WebSocket
from muxtwist.matchers.http import parse_request_head
from muxtwist.redirect import RedirectToHTTPS, location
from tests.processes import stop_group
from tests.test_proxy_support import connect, free_port, mux, need, port_open, run, tempdir

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE
INFO = ConnectionInfo()


def request(target: bytes, *hosts: bytes) -> bytes:
    """A GET with ``target`` and one Host header per entry of ``hosts``, closing the connection after it."""
    head = b"GET " + target + b" HTTP/1.1\r\n" + b"".join(b"Host: " + h + b"\r\n" for h in hosts)
    return head + b"Connection: close\r\n\r\n"


class HostMatcherTests(unittest.TestCase):
    """What HTTP1(host=...) takes as the request's host."""

    def test_url_in_query_is_not_the_host(self) -> None:
        """A URL inside the query string never stands for the host; Host does."""
        data = request(b"/?x=http://public.test", b"admin.internal")
        self.assertIs(HTTP1(host="public.test").match(data, INFO), NO_MATCH)
        self.assertIs(HTTP1(host="admin.internal").match(data, INFO), MATCH)
        data = request(b"/?n=http://a.test", b"public.test")
        self.assertIs(HTTP1(host="a.test").match(data, INFO), NO_MATCH)
        self.assertIs(HTTP1(host="public.test").match(data, INFO), MATCH)

    def test_url_in_query_is_not_the_path(self) -> None:
        """The path of an origin-form target is the path, whatever URL its query holds."""
        data = request(b"/p?u=http://x/admin/y", b"a.test")
        self.assertIs(HTTP1(path="/admin/*").match(data, INFO), NO_MATCH)
        self.assertIs(HTTP1(path="/p").match(data, INFO), MATCH)

    def test_absolute_uri_host(self) -> None:
        """An absolute-form target names the host, with or without a Host header that agrees."""
        self.assertIs(HTTP1(host="a.test").match(request(b"http://a.test/x", b"a.test"), INFO), MATCH)
        self.assertIs(HTTP1(host="a.test").match(request(b"http://A.test:8080/x", b"a.test:8080"), INFO), MATCH)
        self.assertIs(HTTP1(host="a.test").match(b"GET http://u@a.test/ HTTP/1.0\r\n\r\n", INFO), MATCH)
        self.assertIs(HTTP1(host="a.test").match(request(b"HTTPS://a.test?q", b"a.test."), INFO), MATCH)

    def test_absolute_uri_naming_another_host_is_ambiguous(self) -> None:
        """An absolute URI whose host differs from Host matches neither host."""
        data = request(b"http://public.test/", b"admin.internal")
        self.assertIs(HTTP1(host="public.test").match(data, INFO), NO_MATCH)
        self.assertIs(HTTP1(host="admin.internal").match(data, INFO), NO_MATCH)
        self.assertIs(HTTP1(host="*").match(data, INFO), NO_MATCH)
        self.assertIs(HTTP1().match(data, INFO), MATCH)

    def test_duplicate_host_headers_are_ambiguous(self) -> None:
        """Two Host headers, the same or not, match no host rule."""
        for hosts in ((b"public.test", b"admin.internal"), (b"admin.internal", b"public.test"), (b"a.test",) * 2):
            data = request(b"/", *hosts)
            for glob in ("public.test", "admin.internal", "a.test", "*"):
                self.assertIs(HTTP1(host=glob).match(data, INFO), NO_MATCH, (hosts, glob))
        verdict, head = parse_request_head(request(b"/", b"a.test", b"b.test"))
        assert head is not None
        self.assertIsNone(head.host)

    def test_trailing_dot(self) -> None:
        """``admin.internal.`` is ``admin.internal``, in the request and in the rule, any case, any port."""
        for host in (b"admin.internal.", b"ADMIN.Internal.", b"admin.internal.:8080", b"admin.internal"):
            for glob in ("admin.internal", "admin.internal.", "*.internal"):
                self.assertIs(HTTP1(host=glob).match(request(b"/", host), INFO), MATCH, (host, glob))
        self.assertIs(HTTP1(host="admin.internal").match(request(b"/", b"admin.internal.."), INFO), NO_MATCH)

    def test_connect_target_names_the_host(self) -> None:
        """A CONNECT's authority-form target is its host; a Host header naming another host makes it ambiguous."""

        def connect_request(target: bytes, *hosts: bytes) -> bytes:
            head = b"CONNECT " + target + b" HTTP/1.1\r\n" + b"".join(b"Host: " + h + b"\r\n" for h in hosts)
            return head + b"\r\n"

        for data in (
            connect_request(b"admin.internal:443", b"admin.internal:443"),
            connect_request(b"admin.internal:443"),
        ):
            self.assertIs(HTTP1(host="admin.internal").match(data, INFO), MATCH, data)
            self.assertIs(HTTP1(host="public.test").match(data, INFO), NO_MATCH, data)
        data = connect_request(b"admin.internal:443", b"public.test")
        for glob in ("public.test", "admin.internal", "*"):
            self.assertIs(HTTP1(host=glob).match(data, INFO), NO_MATCH, glob)
        self.assertIs(HTTP1(host="*").match(connect_request(b"a@admin.internal:443"), INFO), NO_MATCH)

    def test_invalid_host_values_match_nothing(self) -> None:
        """A Host value that is no host (spaces, commas, an empty one) matches no host rule, not even ``*``."""
        for host in (b"a.test evil", b"a.test,admin.internal", b"", b".", b"a.test/x"):
            self.assertIs(HTTP1(host="*").match(request(b"/", host), INFO), NO_MATCH, host)


def response_body(data: bytes) -> bytes:
    """The body of an HTTP/1 response ``data`` (b"" when there was no response at all)."""
    return data.partition(b"\r\n\r\n")[2]


@provider(ILogObserver)
class _Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: LogEvent) -> None:
        self.lines.append(formatEvent(event))


class RedirectTests(unittest.TestCase):
    """RedirectToHTTPS keeps every Location on the host and answers HEAD without a body."""

    def answer(self, data: bytes, port: int | None = None) -> bytes:
        site = RedirectToHTTPS(port)
        proto = site.buildProtocol(None)
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(data)
        proto.connectionLost(Failure(ConnectionDone()))
        return transport.value()  # type: ignore[no-any-return]

    def test_target_not_starting_with_slash_gets_400(self) -> None:
        """``GET @evil.example/x`` is answered 400, never ``Location: https://a.test@evil.example/x``."""
        for target in (b"@evil.example/x", b"evil.example/x", b".evil.example", b"a.test:443"):
            out = self.answer(request(target, b"a.test"))
            self.assertTrue(out.startswith(b"HTTP/1.1 400 "), (target, out))
            self.assertNotIn(b"location:", out.lower(), target)
        # twisted.web answers the asterisk form itself (405), without reaching the redirect.
        self.assertNotIn(b"location:", self.answer(request(b"*", b"a.test")).lower())

    def test_location_path_starts_with_slash(self) -> None:
        """Every Location built is https, the Host's name, then a path starting with '/'."""
        self.assertEqual(location(b"a.test", None, b"@evil.example/x"), None)
        self.assertEqual(location(b"a.test:80", None, b"/x?y=1"), b"https://a.test/x?y=1")
        self.assertEqual(location(b"a.test", 8443, b"//evil.example/x"), b"https://a.test:8443//evil.example/x")
        self.assertEqual(location(b"a.test", None, b"http://evil.example"), b"https://a.test/")
        self.assertEqual(location(b"a.test", None, b"http://u@evil.example?q"), b"https://a.test/?q")
        self.assertEqual(location(b"a.test@evil.example", None, b"/"), None)
        out = self.answer(request(b"http://evil.example", b"a.test"))
        self.assertIn(b"Location: https://a.test/\r\n", out)

    def test_several_host_headers_get_400(self) -> None:
        """A request with two Host headers (RFC 9112 section 3.2: 400) gets 400 and no Location naming either host."""
        for hosts in ((b"a.test", b"evil.example"), (b"evil.example", b"a.test"), (b"a.test", b"a.test")):
            out = self.answer(request(b"/x", *hosts))
            self.assertTrue(out.startswith(b"HTTP/1.1 400 "), (hosts, out))
            self.assertNotIn(b"location:", out.lower(), hosts)
        out = self.answer(b"GET /x HTTP/1.1\r\nHost: a.test\r\nhOsT: evil.example\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out)

    def test_http11_without_host_gets_400(self) -> None:
        """HTTP/1.1 without Host gets 400 (RFC 9112 section 3.2); HTTP/1.0 without Host still gets a redirect."""
        out = self.answer(b"GET /x HTTP/1.1\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out)
        self.assertNotIn(b"location:", out.lower())
        out = self.answer(b"GET /x HTTP/1.0\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.0 301 "), out)

    def test_head_has_no_body(self) -> None:
        """HEAD gets the redirect's status and headers, with the GET body's length and no body, and no log line."""
        observer = _Lines()
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        out = self.answer(b"HEAD /x HTTP/1.1\r\nHost: a.test\r\n\r\n")
        get = self.answer(b"GET /x HTTP/1.1\r\nHost: a.test\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 301 "), out)
        self.assertIn(b"Location: https://a.test/x\r\n", out)
        self.assertEqual(response_body(out), b"")
        length = b"Content-Length: %d\r\n" % len(response_body(get))
        self.assertIn(length, out)
        self.assertEqual([line for line in observer.lines if "eat it" in line], [])
        bad = self.answer(b"HEAD @evil.example/x HTTP/1.1\r\nHost: a.test\r\n\r\n")
        self.assertTrue(bad.startswith(b"HTTP/1.1 400 "), bad)
        self.assertEqual(response_body(bad), b"")

    async def test_curl_head_through_the_mux(self) -> None:
        """``curl -I`` through the mux gets the 301 and its Location, and nothing after the headers."""
        port, _ = mux(self, [Rule(HTTP1(), RedirectToHTTPS())])
        out, err, code = await run([need("curl"), "-sS", "-I", "-m", "10", f"http://127.0.0.1:{port}/a?b=1"])
        self.assertEqual(code, 0, err)
        self.assertIn(b"301", out.splitlines()[0])
        self.assertIn(b"Location: https://127.0.0.1/a?b=1", out)


def start_vhost_nginx(case: unittest.TestCase) -> int:
    """An nginx on loopback serving public.test, admin.internal and a default server; stopped with its group."""
    directory = tempdir(case)
    port = free_port()
    conf = os.path.join(directory, "nginx.conf")
    servers = "".join(
        f"""
    server {{
        listen 127.0.0.1:{port}{" default_server" if name == "_" else ""};
        server_name {name};
        location / {{ return 200 "{body}"; }}
    }}"""
        for name, body in (("_", "DEFAULT"), ("public.test", "PUBLIC"), ("admin.internal", "ADMIN"))
    )
    with open(conf, "w") as f:
        f.write(
            f"""
pid {directory}/nginx.pid;
error_log {directory}/error.log;
master_process off;
daemon off;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;{servers}
}}
"""
        )
    proc = subprocess.Popen(
        [need("nginx"), "-c", conf, "-p", directory],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def stop() -> None:
        stop_group(proc)

    case.addCleanup(stop)
    case.nginx_proc = proc  # type: ignore[attr-defined]
    return port


def _page(body: bytes) -> Data:
    page = Data(body, "text/plain")  # type: ignore[no-untyped-call]
    page.isLeaf = True
    return page


def vhost_site() -> Site:
    """A twisted.web site with name-based virtual hosts public.test and admin.internal, and a default."""
    root = NameVirtualHost()  # type: ignore[no-untyped-call]
    root.default = _page(b"DEFAULT")
    root.addHost(b"public.test", _page(b"PUBLIC"))  # type: ignore[no-untyped-call]
    root.addHost(b"admin.internal", _page(b"ADMIN"))  # type: ignore[no-untyped-call]
    return Site(root)  # type: ignore[no-untyped-call]


#: (label, rules kind, request, body nginx serves, body the twisted.web vhost serves); b"" means
#: the mux closed the connection without a response. "allow" routes public.test to the
#: server and rejects admin.internal; "deny" rejects admin.internal and sends the rest on.
CASES: list[tuple[str, str, bytes, bytes, bytes]] = [
    ("public", "allow", request(b"/", b"public.test"), b"PUBLIC", b"PUBLIC"),
    ("admin", "allow", request(b"/", b"admin.internal"), b"", b""),
    ("admin, deny", "deny", request(b"/", b"admin.internal"), b"", b""),
    ("other host, deny", "deny", request(b"/", b"other.test"), b"DEFAULT", b"DEFAULT"),
    ("url in query", "allow", request(b"/?x=http://public.test", b"admin.internal"), b"", b""),
    ("url in query, deny", "deny", request(b"/?x=http://admin.internal", b"public.test"), b"PUBLIC", b"PUBLIC"),
    ("duplicate host", "allow", request(b"/", b"public.test", b"admin.internal"), b"", b""),
    ("duplicate host reversed", "allow", request(b"/", b"admin.internal", b"public.test"), b"", b""),
    ("absolute uri, other host", "allow", request(b"http://public.test/", b"admin.internal"), b"", b""),
    ("absolute uri, same host", "allow", request(b"http://public.test/", b"public.test"), b"PUBLIC", b"PUBLIC"),
    ("trailing dot, deny", "deny", request(b"/", b"admin.internal."), b"", b""),
    (
        "CONNECT naming admin, Host public",
        "allow",
        b"CONNECT admin.internal:443 HTTP/1.1\r\nHost: public.test\r\n\r\n",
        b"",
        b"",
    ),
    ("userinfo before admin", "allow", b"GET http://public.test@admin.internal/ HTTP/1.0\r\n\r\n", b"", b""),
    ("Host with a space before the colon", "allow", b"GET / HTTP/1.1\r\nHost : public.test\r\n\r\n", b"", b""),
    ("folded Host", "allow", b"GET / HTTP/1.1\r\nHost: public.test\r\n admin.internal\r\n\r\n", b"", b""),
    ("Host, port not a number", "allow", request(b"/", b"public.test:abc"), b"", b""),
    (
        "Host in mixed case",
        "allow",
        b"GET / HTTP/1.1\r\nhOsT: PUBLIC.test\r\nConnection: close\r\n\r\n",
        b"PUBLIC",
        b"PUBLIC",
    ),
    # nginx drops the dot and serves public.test; twisted.web's vhost table has no "public.test.".
    ("trailing dot, allow", "allow", request(b"/", b"public.test."), b"PUBLIC", b"DEFAULT"),
]


class RealServerHostTests(unittest.TestCase):
    """With real servers behind the mux, a host rule routes the request the server then serves."""

    async def exchange(self, port: int, data: bytes) -> bytes:
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(data)
        await client.closed(10)
        return bytes(client.received)

    def rules(self, kind: str, server: Any) -> list[Rule]:
        if kind == "allow":
            return [
                Rule(HTTP1(host="public.test"), server, name="public"),
                Rule(HTTP1(host="admin.internal"), Reject(), name="admin"),
            ]
        return [Rule(HTTP1(host="admin.internal"), Reject(), name="admin"), Rule(HTTP1(), server, name="rest")]

    async def check(self, server: Any, column: int) -> None:
        ports = {kind: mux(self, self.rules(kind, server))[0] for kind in ("allow", "deny")}
        seen = []
        for case in CASES:
            label, kind, data = case[0], case[1], case[2]
            out = await self.exchange(ports[kind], data)
            self.assertNotIn(b"ADMIN", out, label)
            seen.append((label, response_body(out)))
        self.assertEqual(seen, [(case[0], case[column]) for case in CASES])  # type: ignore[misc]

    async def test_twisted_web_vhost(self) -> None:
        """A twisted.web NameVirtualHost behind the mux never serves admin.internal, however the request names it."""
        await self.check(vhost_site(), 4)

    async def test_nginx(self) -> None:
        """nginx behind the mux never serves admin.internal, however the request names it."""
        nginx = start_vhost_nginx(self)
        await port_open(nginx, self.nginx_proc)  # type: ignore[attr-defined]
        await self.check(Proxy(f"tcp:host=127.0.0.1:port={nginx}"), 3)


class PathRuleTests(unittest.TestCase):
    """What HTTP1(path=...) and WebSocket(path=...) compare: the path as the server behind resolves it."""

    def test_dot_segments_resolved(self) -> None:
        """``/public/../admin`` is ``/admin``: it matches an /admin rule and escapes no /public rule."""
        data = request(b"/public/../admin/x", b"a.test")
        self.assertIs(HTTP1(path="/admin/*").match(data, INFO), MATCH)
        self.assertIs(HTTP1(path="/public/*").match(data, INFO), NO_MATCH)
        self.assertIs(HTTP1(path="/a/").match(request(b"/a/b/..", b"a.test"), INFO), MATCH)

    def test_percent_escapes_and_repeated_slashes(self) -> None:
        """``/%61dmin``, ``//admin`` and ``/public%2F..%2Fadmin`` are all ``/admin``, as nginx reads them."""
        for target in (b"/%61dmin/x", b"//admin//x", b"/public%2F..%2Fadmin/x", b"/./admin/x"):
            self.assertIs(HTTP1(path="/admin/*").match(request(target, b"a.test"), INFO), MATCH, target)
            self.assertIs(HTTP1(path="/public/*").match(request(target, b"a.test"), INFO), NO_MATCH, target)

    def test_dot_segment_with_parameters_matches_no_path_rule(self) -> None:
        """``/public/..;/admin`` matches no path rule: Tomcat-style servers drop ``;x`` and climb, nginx does not."""
        for target in (b"/public/..;/admin", b"/public/..;x=1/admin", b"/public/%2e%2e;/admin", b"/public/.;/x"):
            for glob in ("/public/*", "/admin*", "*"):
                self.assertIs(HTTP1(path=glob).match(request(target, b"a.test"), INFO), NO_MATCH, (target, glob))
        # Parameters on ordinary segments stay part of the path.
        self.assertIs(HTTP1(path="/app/*").match(request(b"/app/page;jsessionid=1", b"a.test"), INFO), MATCH)
        self.assertIs(HTTP1(path="/public/*").match(request(b"/public/...;x/y", b"a.test"), INFO), MATCH)

    def test_escaped_control_characters_match_no_path_rule(self) -> None:
        """A path with an escaped NUL or line break matches no path rule, not even ``*``."""
        for target in (b"/x%00", b"/x%0d%0aSet-Cookie:%20a", b"/%ff"):
            self.assertIs(HTTP1(path="*").match(request(target, b"a.test"), INFO), NO_MATCH, target)

    def test_websocket_connection_header_over_two_lines(self) -> None:
        """A handshake with ``Connection: keep-alive`` and ``Connection: Upgrade`` on separate lines is WebSocket."""
        data = (
            b"GET /chat HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.assertIs(WebSocket().match(data, INFO), MATCH)
        self.assertIs(WebSocket(path="/c*").match(data.replace(b"/chat", b"/x/../chat"), INFO), MATCH)
