"""
The server processes the benchmarks start, one per contender, each run as
``python -m bench.servers KIND --port N [options]`` so that its CPU time and
memory can be read from ``/proc`` on its own.

Kinds:

- ``responder``: a minimal keep-alive HTTP/1.1 responder (a raw Protocol).
- ``responder-sniff``: the same behind a SniffingFactory whose winning rule
  is the 6th of 6.
- ``site``: a ``twisted.web`` Site alone.
- ``site-mux``: the same Site sharing its port with an echo service (SSH rule).
- ``proxy``: muxtwist ``Proxy``: HTTP to ``--http-backend``, anything else to
  ``--other-backend``.
- ``scale-sniff`` / ``scale-proxy``: idle-connection holders with a control
  port that reports RSS and (with ``--tracemalloc``) the Python heap.
- ``sink``: accepts connections and holds them.
- ``tls-terminate``: ``TerminateTLS`` serving the Site; ``tls-plain``: an
  ``ssl:`` endpoint serving the same Site.
- ``sni-proxy``: muxtwist's TLS(sni=...) matcher with a Proxy (SNI passthrough).

muxtwist's factories run with ``log_connections=False`` unless ``--log-file``
is given: then the process logs to that file as ``twistd -l FILE muxtwist``
does, one ``connection_end`` line per connection (muxtwist's default).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tracemalloc
from typing import Any

from twisted.internet import endpoints, protocol
from twisted.internet.interfaces import IProtocolFactory
from twisted.protocols.basic import LineReceiver
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

BODY = b"hello, world\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
)
CLOSE_RESPONSE = RESPONSE.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)


class Responder(protocol.Protocol):
    """Answers each complete request head with one fixed response; honours ``Connection: close``."""

    def __init__(self) -> None:
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer + data
        end = buffer.find(b"\r\n\r\n")
        while end >= 0:
            head = buffer[:end]
            buffer = buffer[end + 4 :]
            if b"onnection: close" in head or b"onnection: Close" in head:
                assert self.transport is not None
                self.transport.write(CLOSE_RESPONSE)
                self.transport.loseConnection()
                self._buffer = b""
                return
            assert self.transport is not None
            self.transport.write(RESPONSE)
            end = buffer.find(b"\r\n\r\n")
        self._buffer = buffer


class Hello(Resource):
    """A leaf resource answering every GET with a short body."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return BODY


class Hold(protocol.Protocol):
    """Accepts whatever comes and answers nothing."""


def site() -> Site:
    """The Site every Site-serving contender uses."""
    return Site(Hello())  # type: ignore[no-untyped-call]


def _factory(proto: type[protocol.Protocol]) -> protocol.Factory:
    return protocol.Factory.forProtocol(proto)


def _sixth_of_six(winner: IProtocolFactory) -> Any:
    from muxtwist import Rule, SniffingFactory
    from muxtwist.matchers import HTTP1, MQTT, SSH, TLS, PostgreSQL, Redis

    other = _factory(Hold)
    rules = [
        Rule(TLS(), other),
        Rule(SSH(), other),
        Rule(Redis(), other),
        Rule(PostgreSQL(), other),
        Rule(MQTT(), other),
        Rule(HTTP1(), winner),
    ]
    return SniffingFactory(rules, sniff_timeout=600.0)


def build(kind: str, options: argparse.Namespace) -> tuple[Any, str]:
    """The factory and listening endpoint description for ``kind``."""
    listen = f"tcp:{options.port}:interface=127.0.0.1:backlog=4096"
    if kind == "responder":
        return _factory(Responder), listen
    if kind == "responder-sniff":
        return _sixth_of_six(_factory(Responder)), listen
    if kind == "site":
        return site(), listen
    if kind == "sink":
        return _factory(Hold), listen
    from muxtwist import Rule, SniffingFactory
    from muxtwist.matchers import HTTP1, SSH, TLS
    from muxtwist.matchers import Any as AnyBytes

    if kind == "site-mux":
        from twisted.protocols.wire import Echo

        return SniffingFactory([Rule(SSH(), _factory(Echo)), Rule(HTTP1(), site())]), listen
    if kind in ("proxy", "scale-proxy"):
        from muxtwist.actions import Proxy

        rules = []
        if options.http_backend:
            rules.append(Rule(HTTP1(), Proxy(f"tcp:host=127.0.0.1:port={options.http_backend}")))
        rules.append(Rule(AnyBytes(), Proxy(f"tcp:host=127.0.0.1:port={options.other_backend}")))
        return SniffingFactory(rules, sniff_timeout=600.0), listen
    if kind == "scale-sniff":
        return _sixth_of_six(_factory(Responder)), listen
    if kind == "tls-terminate":
        from muxtwist.actions import TerminateTLS

        terminate = TerminateTLS({"DEFAULT": options.cert}, site())
        return SniffingFactory([Rule(TLS(), terminate)]), listen
    if kind == "tls-plain":
        return site(), f"ssl:{options.port}:interface=127.0.0.1:backlog=4096:privateKey={options.cert}"
    if kind == "sni-proxy":
        from muxtwist.actions import Proxy

        proxy = Proxy(f"tcp:host=127.0.0.1:port={options.other_backend}")
        return SniffingFactory([Rule(TLS(sni=options.sni), proxy)]), listen
    raise SystemExit(f"unknown server kind {kind!r}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _count(factory: Any) -> dict[str, int]:
    """Live connections of a scale server: sniffing ones, and relays linked to a backend."""
    counts = {"connections": len(getattr(factory, "connections", ()))}
    relays = 0
    linked = 0
    for rule in getattr(factory, "rules", ()):
        found = getattr(rule.factory, "relays", None)
        if found is not None:
            relays += len(found)
            linked += sum(1 for r in found if getattr(r, "side", None) is not None)
    counts["relays"] = relays
    counts["linked"] = linked
    return counts


class Control(LineReceiver):
    """
    ``stats`` answers one JSON line: RSS, Python heap (when traced) and
    connection counts, after a full collection; ``count`` the counts alone.
    """

    delimiter = b"\n"

    def __init__(self, watched: Any) -> None:
        self.watched = watched
        self.baseline: tracemalloc.Snapshot | None = None

    def lineReceived(self, line: bytes) -> None:
        command = line.strip()
        if command == b"stats":
            gc.collect()
            stats: dict[str, Any] = {"rss": _rss_bytes(), **_count(self.watched)}
            if tracemalloc.is_tracing():
                stats["heap"], stats["heap_peak"] = tracemalloc.get_traced_memory()
            self.sendLine(json.dumps(stats).encode())  # type: ignore[no-untyped-call]
        elif command == b"count":
            # The connection counts alone, for polling: no gc.collect(), which takes
            # about 0.25 s with 10,000 relays open and holds the reactor all that time.
            self.sendLine(json.dumps(_count(self.watched)).encode())  # type: ignore[no-untyped-call]
        elif command == b"mark":
            gc.collect()
            self.baseline = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
            self.sendLine(b"{}")  # type: ignore[no-untyped-call]
        elif command == b"top":
            # What grew since "mark": the allocations the open connections hold, by source line.
            lines = []
            if tracemalloc.is_tracing() and self.baseline is not None:
                gc.collect()
                grown = tracemalloc.take_snapshot().compare_to(self.baseline, "lineno")
                lines = [str(stat) for stat in grown[:15]]
            self.sendLine(json.dumps(lines).encode())  # type: ignore[no-untyped-call]
        else:
            self.sendLine(b'{"error": "unknown command"}')  # type: ignore[no-untyped-call]


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (200_000, 65_536, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
            return
        except (ValueError, OSError):
            continue


def main(argv: list[str] | None = None) -> None:
    """Start one benchmark server and run the reactor until killed."""
    parser = argparse.ArgumentParser(prog="python -m bench.servers")
    parser.add_argument("kind")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control", type=int, default=0)
    parser.add_argument("--http-backend", type=int, default=0)
    parser.add_argument("--other-backend", type=int, default=0)
    parser.add_argument("--cert", default="")
    parser.add_argument("--sni", default="bench.test")
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument(
        "--log-file",
        default="",
        help="log to this file as twistd muxtwist does, with muxtwist's connection_end event on (off without it)",
    )
    options = parser.parse_args(argv)
    if options.tracemalloc:
        tracemalloc.start()
    _raise_nofile()
    from twisted.internet import reactor

    factory, description = build(options.kind, options)
    if hasattr(factory, "log_connections"):
        # Without --log-file, as the other contenders run: nginx with access_log
        # off, HAProxy and sslh with no line per connection.
        factory.log_connections = bool(options.log_file)
    if options.log_file:
        from twisted.logger import globalLogBeginner

        from muxtwist._textlog import text_log_observer, use_twistd_options

        # The observer `twistd -l FILE muxtwist` logs to.
        use_twistd_options({"logfile": options.log_file})
        globalLogBeginner.beginLoggingTo([text_log_observer()], redirectStandardIO=False)
    if hasattr(factory, "set_rules"):
        from muxtwist._listener import Listener

        # Listening as `twistd muxtwist` and MuxService do.
        Listener(description, factory, reactor).startService()
    else:
        endpoints.serverFromString(reactor, description).listen(factory)
    if options.control:
        control = protocol.Factory.forProtocol(lambda: Control(factory))
        endpoints.serverFromString(reactor, f"tcp:{options.control}:interface=127.0.0.1").listen(control)
    # A line on stdout tells the harness which reactor runs; it is read once.
    sys.stdout.write(f"reactor {type(reactor).__module__}.{type(reactor).__qualname__}\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
