"""
The load driver: a plain-socket client with one selector, run as its own
process (``python -m tests.reliability.client``) so the load and the server
under test never share a CPU-bound event loop.

It reads a job (JSON) on stdin: a list of groups of connections, each
connection one of

- ``echo``: send ``opener`` + a seeded random payload (optionally dribbled:
  ``chunk`` bytes every ``delay`` seconds; optionally only after every
  connection of the group has been routed: ``barrier``), half-close, read
  to the end and check the reply: ``"<service> <source>\\n"`` then every byte
  sent, in order (by sha256); ``strip`` is what the sniffer may write first,
  ``reply`` what it may replay of the opener instead of all of it.
  ``expect`` is the service that must answer, or ``null`` for a connection the server must close unrouted;
- ``abort``: connect and reset at once, sending nothing;
- ``hold``: connect, send ``opener``, then one byte every ``interval``
  seconds (or nothing), and record when the server closes it.

It prints progress events as JSON lines (``{"event": "routed", "group": g}``
once every connection of group ``g`` has its service's greeting) and at the
end ``{"event": "done", "groups": [...]}`` with counts, latencies and close
times per group.
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import json
import random
import resource
import selectors
import socket
import struct
import sys
import time
from collections import Counter
from typing import Any

__all__ = ["main"]

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE


def payload(seed: int, size: int) -> bytes:
    """The payload of connection ``seed``: ``size`` seeded random bytes."""
    return random.Random(seed).randbytes(size)


def raise_nofile() -> None:
    """Raise this process's open-file limit to its hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Conn:
    """One client connection and what it has seen."""

    def __init__(self, group: Group, index: int) -> None:
        self.group = group
        spec = group.spec
        self.kind: str = spec["kind"]
        self.opener = bytes.fromhex(spec.get("opener", ""))
        size = int(spec.get("size", 0))
        self.body = payload(int(spec.get("seed", 0)) * 1_000_003 + index, size) if size else b""
        self.out = self.opener if spec.get("barrier") else self.opener + self.body
        self.sent = 0
        self.strip = bytes.fromhex(spec.get("strip", ""))
        # What the service must echo of the opener, when the server was
        # allowed to drop part of it (the HTTP/2 SETTINGS ACK a responding
        # matcher provoked).
        self.reply = bytes.fromhex(spec["reply"]) if "reply" in spec else self.opener
        self.head = bytearray()
        self.greeting: bytes | None = None
        self.digest = hashlib.sha256()
        self.received = 0
        self.sock: socket.socket | None = None
        self.started = 0.0
        self.next_send = 0.0
        self.outcome: str | None = None
        self.closed_after: float | None = None
        self.shut = False
        self.ended: float | None = None
        self.events = READ | WRITE

    # setup

    def start(self, sel: selectors.BaseSelector, now: float) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        self.sock = sock
        self.started = now
        self.next_send = now
        err = sock.connect_ex(tuple(self.group.address))
        if err not in (0, errno.EINPROGRESS):
            self.finish(sel, f"connect:{errno.errorcode.get(err, err)}", now)
            return
        sel.register(sock, READ | WRITE, self)

    # events

    def want(self, sel: selectors.BaseSelector, now: float) -> None:
        """Register for what this connection waits on now; a later send goes on the timer heap."""
        if self.sock is None:
            return
        events = READ
        if not self.shut and self.wants_to_send():
            if now >= self.next_send:
                events |= WRITE
            else:
                heapq.heappush(self.group.timers, (self.next_send, id(self), self))
        if events != self.events:
            self.events = events
            sel.modify(self.sock, events, self)

    def wants_to_send(self) -> bool:
        if self.kind == "hold":
            return self.sent < len(self.out)
        return self.sent < len(self.out) or (self.ready_to_end() and not self.shut)

    def writable(self, sel: selectors.BaseSelector, now: float) -> None:
        sock = self.sock
        assert sock is not None
        if self.kind == "abort":
            # Connected: reset at once, without a byte (SO_LINGER 0 makes close send RST).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.finish(sel, "ok", now)
            return
        if self.sent < len(self.out):
            spec = self.group.spec
            chunk = int(spec.get("chunk", 0)) or len(self.out)
            try:
                n = sock.send(self.out[self.sent : self.sent + chunk])
            except BlockingIOError:
                return
            except OSError as e:
                self.lost(sel, now, e)
                return
            self.sent += n
            delay = float(spec.get("delay", 0.0))
            if delay:
                self.next_send = now + delay
        if self.sent >= len(self.out) and self.kind == "echo" and self.ready_to_end():
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                self.lost(sel, now, e)
                return
            self.shut = True
        if self.kind == "hold" and self.sent >= len(self.out):
            interval = float(self.group.spec.get("interval", 0.0))
            if interval:
                self.out += b"x"
                self.next_send = now + interval
        self.want(sel, now)

    def ready_to_end(self) -> bool:
        return len(self.out) == len(self.opener) + len(self.body)

    def readable(self, sel: selectors.BaseSelector, now: float) -> None:
        sock = self.sock
        assert sock is not None
        try:
            data = sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as e:
            self.lost(sel, now, e)
            return
        if not data:
            self.lost(sel, now, None)
            return
        if self.greeting is None:
            self.head += data
            if self.strip and self.head.startswith(self.strip):
                del self.head[: len(self.strip)]
                self.strip = b""
            nl = self.head.find(b"\n")
            if nl < 0:
                if len(self.head) > 256:
                    self.finish(sel, "garbled", now)
                return
            self.greeting = bytes(self.head[:nl])
            data = bytes(self.head[nl + 1 :])
            self.group.routed(self, sel, now)
        self.digest.update(data)
        self.received += len(data)

    def release(self, sel: selectors.BaseSelector, now: float) -> None:
        """The group's barrier fell: send the payload too."""
        if len(self.out) < len(self.opener) + len(self.body):
            self.out = self.opener + self.body
            self.want(sel, now)

    def lost(self, sel: selectors.BaseSelector, now: float, error: OSError | None) -> None:
        self.closed_after = now - self.started
        if self.kind == "hold":
            self.finish(sel, "closed" if self.greeting is None else "routed", now)
            return
        expect = self.group.spec.get("expect")
        name = None if self.greeting is None else self.greeting.split(b" ")[0].decode(errors="replace")
        if name is None:
            what = "closed" if error is None else f"reset:{type(error).__name__}"
            self.finish(sel, "ok" if expect is None else what, now)
        elif name != expect:
            self.finish(sel, f"misrouted:{name}", now)
        elif error is not None:
            self.finish(sel, f"reset:{type(error).__name__}", now)
        elif self.received != len(self.reply) + len(self.body) or self.digest.digest() != self.expected_digest():
            self.finish(sel, "corrupt", now)
        else:
            self.finish(sel, "ok", now)

    def expected_digest(self) -> bytes:
        return hashlib.sha256(self.reply + self.body).digest()

    def finish(self, sel: selectors.BaseSelector, outcome: str, now: float) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        self.ended = now
        if self.closed_after is None:
            self.closed_after = now - self.started
        if self.sock is not None:
            try:
                sel.unregister(self.sock)
            except (KeyError, ValueError):
                pass
            self.sock.close()
            self.sock = None
        self.group.finished(self, sel, now)


class Group:
    """Connections made alike; ``spec`` is the group's part of the job."""

    def __init__(self, index: int, spec: dict[str, Any], address: tuple[str, int], out: Any) -> None:
        self.index = index
        self.spec = spec
        self.address = address
        self.out = out
        self.conns = [Conn(self, i) for i in range(int(spec["count"]))]
        self.pending = list(self.conns)
        self.unrouted = len(self.conns)
        self.done = 0
        self.sources: Counter[str] = Counter()
        self.timers: list[tuple[float, int, Conn]] = []
        self.barriers: dict[str, set[Conn]] = {}
        self.all_groups: list[Group] = []

    def routed(self, conn: Conn, sel: selectors.BaseSelector, now: float) -> None:
        assert conn.greeting is not None
        parts = conn.greeting.split(b" ")
        if len(parts) > 1:
            self.sources[parts[1].decode(errors="replace")] += 1
        self.unrouted -= 1
        if self.unrouted == 0:
            self.out.write(json.dumps({"event": "routed", "group": self.spec.get("name", self.index)}) + "\n")
            self.out.flush()
        self.leave_barrier(conn, sel, now)

    def leave_barrier(self, conn: Conn, sel: selectors.BaseSelector, now: float) -> None:
        barrier = self.spec.get("barrier")
        waiting = self.barriers.get(barrier) if barrier else None
        if waiting is None or conn not in waiting:
            return
        waiting.remove(conn)
        if not waiting:
            for g in self.all_groups:
                if g.spec.get("barrier") == barrier:
                    for c in g.conns:
                        if c.outcome is None:
                            c.release(sel, now)

    def finished(self, conn: Conn, sel: selectors.BaseSelector, now: float) -> None:
        self.done += 1
        self.leave_barrier(conn, sel, now)

    def summary(self) -> dict[str, Any]:
        outcomes = Counter(c.outcome or "unfinished" for c in self.conns)
        times = sorted(c.closed_after for c in self.conns if c.closed_after is not None)

        def pct(p: float) -> float | None:
            return round(times[min(len(times) - 1, int(p * len(times)))], 4) if times else None

        return {
            "name": self.spec.get("name", str(self.index)),
            "count": len(self.conns),
            "outcomes": dict(outcomes),
            "bytes_sent": sum(c.sent for c in self.conns),
            "sources": dict(self.sources),
            "min": times[0] if times else None,
            "p50": pct(0.5),
            "p99": pct(0.99),
            "max": times[-1] if times else None,
            # time.monotonic() is the system-wide CLOCK_MONOTONIC: comparable across processes.
            "last_end": max((c.ended for c in self.conns if c.ended is not None), default=None),
        }


def run(job: dict[str, Any], out: Any) -> dict[str, Any]:
    """Run a job to its end (or its ``deadline``) and return the summary."""
    raise_nofile()
    address = ("127.0.0.1", int(job["port"]))
    groups = [Group(i, g, address, out) for i, g in enumerate(job["groups"])]
    # A barrier is shared by every group that names it: no payload goes out
    # until every one of their connections has been routed.
    barriers: dict[str, set[Conn]] = {}
    for g in groups:
        if g.spec.get("barrier"):
            barriers.setdefault(g.spec["barrier"], set()).update(g.conns)
    for g in groups:
        g.barriers = barriers
        g.all_groups = groups
    sel = selectors.DefaultSelector()
    begin = time.monotonic()
    deadline = begin + float(job.get("deadline", 60.0))
    live: set[Conn] = set()
    next_sweep = 0.0
    while True:
        now = time.monotonic()
        for g in groups:
            start_at = begin + float(g.spec.get("start_at", 0.0))
            spacing = float(g.spec.get("spacing", 0.0))
            while g.pending and now >= start_at + spacing * (len(g.conns) - len(g.pending)):
                c = g.pending.pop(0)
                c.start(sel, now)
                if c.outcome is None:
                    live.add(c)
        if now >= next_sweep:
            next_sweep = now + 0.05
            live = {c for c in live if c.outcome is None}
            for c in live:
                if c.kind == "hold" and now - c.started > float(c.group.spec.get("hold_max", 30.0)):
                    c.finish(sel, "held_open", now)
        if all(g.done == len(g.conns) for g in groups) or now > deadline:
            break
        wake = now + 0.01
        for g in groups:
            while g.timers and g.timers[0][0] <= now:
                _, _, c = heapq.heappop(g.timers)
                if c.outcome is None:
                    c.want(sel, now)
            if g.timers:
                wake = min(wake, g.timers[0][0])
        for key, events in sel.select(timeout=max(0.0, wake - now)):
            c = key.data
            now = time.monotonic()
            if c.outcome is None and events & READ:
                c.readable(sel, now)
            if c.outcome is None and events & WRITE:
                c.writable(sel, now)
    for c in [c for g in groups for c in g.conns if c.outcome is None and c.sock is not None]:
        c.finish(sel, "unfinished", time.monotonic())
    return {"event": "done", "elapsed": round(time.monotonic() - begin, 3), "groups": [g.summary() for g in groups]}


def main() -> None:
    job = json.loads(sys.stdin.read())
    result = run(job, sys.stdout)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
