"""
The hostile clients of issue 13, each against a real ``twistd muxtwist``
with real backends, each a row of the "Hostile clients" table: the attack,
the figure measured, and whether the server held.

Every scenario writes its own rules file (the diagnostics rule first, for
the leak check) into a scratch directory, and ends with the leak check:
open descriptors and delayed calls back to their baseline.
"""

from __future__ import annotations

import os
import resource
import selectors
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import TypeVar

from muxtwist.matchers.proxy_protocol import V2_SIGNATURE, build_v1, build_v2
from tests.certs import make_ca, make_certificate
from tests.processes import stop_group
from tests.reliability.backend import answer_for
from tests.reliability.faults import Backend
from tests.reliability.harness import RULES, Row, Sampler, diag, mux_server
from tests.reliability.openers import client_hello
from tests.twistd import ROOT, free_port, twistd_command

__all__ = [
    "echo_backpressure",
    "host_ambiguity",
    "log_hygiene",
    "sighup_storms",
    "silent_untrusted_clients",
    "stalled_handshakes",
    "tls_close",
    "trusted_cut_short_headers",
]

T = TypeVar("T")

#: How late after a timeout a connection may be closed on a loaded 2-CPU machine.
SLACK = 1.5

_HEAD = """\
from muxtwist import Rule
from muxtwist.matchers import Prefix
from tests.reliability.services import Diag

rules = [Rule(Prefix(b"DIAG\\n", name="diag"), Diag())]
"""


@contextmanager
def _scratch() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="muxrel-attack-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _rules(directory: str, body: str) -> str:
    path = os.path.join(directory, "rules.py")
    with open(path, "w") as f:
        f.write(_HEAD + body)
    return path


def _certificates(directory: str) -> dict[str, str]:
    """PEM files: ``mux`` (for mux.test) and ``backend`` (for backend.test), each certificate and key, and ``ca``."""
    ca = make_ca()
    paths = {"ca": os.path.join(directory, "ca.pem")}
    with open(paths["ca"], "wb") as f:
        f.write(ca.cert_pem)
    for name, host in (("mux", "mux.test"), ("backend", "backend.test")):
        leaf = make_certificate(host, ca=ca)
        paths[name] = os.path.join(directory, f"{name}.pem")
        with open(paths[name], "wb") as f:
            f.write(leaf.cert_pem + leaf.key_pem)
    return paths


def _parallel(fn: Callable[[int], T], count: int, workers: int = 25) -> list[T]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, range(count)))


def _read_all(s: socket.socket) -> tuple[bytes, str]:
    """Everything until the end, and how it ended: ``eof``, ``reset``, or ``timeout``."""
    chunks: list[bytes] = []
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return b"".join(chunks), "reset"
        except TimeoutError:
            return b"".join(chunks), "timeout"
        if not chunk:
            return b"".join(chunks), "eof"
        chunks.append(chunk)


def _hostile(name: str, tried: str, times: str, figure: str, result: str, green: bool) -> Row:
    return Row(name, tried, times, result, green, figure=figure, table="hostile")


def _counts(c: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items()))


# 1. TLS close semantics


def tls_close() -> list[Row]:
    """TerminateTLS -> Proxy -> a closing backend: close_notify, whole answers; half-close to a TLS backend."""
    count, size = 50, 100_000
    with ExitStack() as stack:
        directory = stack.enter_context(_scratch())
        pem = _certificates(directory)
        plain = Backend("answer")
        stack.callback(plain.kill)
        secure = Backend("answer", "--tls", pem["backend"], "--pause-answer", "--pause", "0.2")
        stack.callback(secure.kill)
        rules = _rules(
            directory,
            f"""
from muxtwist.actions import Proxy, TerminateTLS
from muxtwist.matchers import TLS
from twisted.internet.ssl import Certificate, optionsForClientTLS

with open({pem["ca"]!r}, "rb") as f:
    _trust = optionsForClientTLS("backend.test", trustRoot=Certificate.loadPEM(f.read()))
rules += [
    Rule(Prefix(b"TLSB ", name="to-tls-backend"), Proxy("tcp:host=127.0.0.1:port={secure.port}", tls=_trust)),
    Rule(TLS(), TerminateTLS({{"DEFAULT": {pem["mux"]!r}}}, Proxy("tcp:host=127.0.0.1:port={plain.port}"))),
]
""",
        )
        server = stack.enter_context(mux_server(rules=rules))
        with open(pem["ca"]) as f:
            context = ssl.create_default_context(cadata=f.read())

        def over_tls(i: int) -> tuple[bool, str]:
            request = b"%d %d\n" % (i, size)
            with socket.create_connection(("127.0.0.1", server.port), timeout=15) as raw:
                with context.wrap_socket(raw, server_hostname="mux.test", suppress_ragged_eofs=False) as s:
                    s.sendall(request)
                    chunks = []
                    while True:
                        try:
                            chunk = s.recv(65536)
                        except ssl.SSLEOFError:
                            ending = "eof without close_notify"
                            break
                        except (OSError, ssl.SSLError) as e:
                            ending = f"error {type(e).__name__}"
                            break
                        if not chunk:
                            ending = "close_notify"
                            break
                        chunks.append(chunk)
            return b"".join(chunks) == answer_for(request), ending

        def half_closed(i: int) -> tuple[bool, str]:
            request = b"TLSB %d %d\n" % (i, size)
            with socket.create_connection(("127.0.0.1", server.port), timeout=15) as s:
                s.sendall(request)
                s.shutdown(socket.SHUT_WR)
                answer, ending = _read_all(s)
            return answer == answer_for(request), ending

        terminated = _parallel(over_tls, count)
        halves = _parallel(half_closed, count)
        leaks = server.leaks()
        errors = server.log_text().count("Unhandled Error")
        code = server.stop()
    t_ok = sum(whole and ending == "close_notify" for whole, ending in terminated)
    h_ok = sum(whole and ending == "eof" for whole, ending in halves)
    t_end = Counter(e for _, e in terminated)
    h_end = Counter(e for _, e in halves)
    return [
        _hostile(
            "TLS close behind TerminateTLS",
            "Python ssl clients (suppress_ragged_eofs off) through TerminateTLS -> Proxy -> a backend that writes "
            "a 100 KB answer and closes: each must read the whole answer, then a close_notify",
            f"{count} connections, {count // 2} at a time",
            f"{t_ok}/{count} whole answer + close_notify",
            f"endings: {_counts(t_end)}; whole answers {sum(w for w, _ in terminated)}/{count}; "
            f"{errors} unhandled errors logged; {leaks}; exit {code}",
            t_ok == count and errors == 0 and leaks.ok and code == 0,
        ),
        _hostile(
            "Half-close towards a TLS backend",
            "plain clients that half-close right after their request, relayed by Proxy(tls=...) to a TLS backend "
            "(asyncio, Python ssl) that answers 100 KB 0.2 s after the request and closes: the half-close must not be "
            "passed on below TLS",
            f"{count} connections, {count // 2} at a time",
            f"{h_ok}/{count} whole answer + clean end",
            f"endings: {_counts(h_end)}; whole answers {sum(w for w, _ in halves)}/{count}; {leaks}; exit {code}",
            h_ok == count and leaks.ok and code == 0,
        ),
    ]


# 2. Untrusted silent clients on a listener that accepts PROXY headers


def silent_untrusted_clients() -> Row:
    """Untrusted clients that send nothing (or CRLF) on an accept_proxy_protocol listener reach on_timeout."""
    count, sniff_timeout = 40, 1.0
    with ExitStack() as stack:
        directory = stack.enter_context(_scratch())
        greeter = Backend("echo")
        stack.callback(greeter.kill)
        rules = _rules(
            directory,
            f"""
from muxtwist.actions import Proxy
from muxtwist.matchers import SSH
from tests.reliability.services import NamedEcho

sniff_timeout = {sniff_timeout!r}
accept_proxy_protocol = ["192.0.2.0/24"]
on_timeout = on_no_match = Proxy("tcp:host=127.0.0.1:port={greeter.port}")
rules += [Rule(SSH(), NamedEcho("ssh"))]
""",
        )
        server = stack.enter_context(mux_server(rules=rules))

        def silent(i: int) -> tuple[str, float]:
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", server.port), timeout=sniff_timeout + 5) as s:
                if i % 2:
                    s.sendall(b"\r\n")
                head = b""
                while b"\n" not in head:
                    try:
                        chunk = s.recv(4096)
                    except (ConnectionResetError, TimeoutError) as e:
                        return type(e).__name__, time.monotonic() - started
                    if not chunk:
                        return "closed", time.monotonic() - started
                    head += chunk
            return ("greeted" if head.startswith(b"echo ") else "other"), time.monotonic() - started

        def labelled(i: int) -> tuple[str, float]:
            outcome, took = silent(i)
            return f"{'CRLF' if i % 2 else 'silent'}: {outcome}", took

        results = _parallel(labelled, count, workers=count)
        leaks = server.leaks()
        code = server.stop()
    outcomes = Counter(o for o, _ in results)
    times = [t for _, t in results]
    greeted = outcomes["silent: greeted"] + outcomes["CRLF: greeted"]
    # The silent ones at sniff_timeout; CRLF, which no rule can match, at the latest then.
    silent_times = [t for i, (_, t) in enumerate(results) if not i % 2]
    in_time = max(times) <= sniff_timeout + SLACK and min(silent_times) >= sniff_timeout * 0.9
    return _hostile(
        "Silent untrusted clients, PROXY listener",
        f"clients from 127.0.0.1 (untrusted: accept_proxy_protocol 192.0.2.0/24) that send nothing, or CRLF, and "
        f"wait, with on_timeout and on_no_match a Proxy to a server-speaks-first backend (sniff_timeout "
        f"{sniff_timeout:g} s): sniffed as on any listener, silence reaching on_timeout, CRLF on_no_match",
        f"{count} connections ({count // 2} silent, {count // 2} CRLF)",
        f"{greeted}/{count} got the backend's greeting after {min(times):.2f}-{max(times):.2f} s",
        f"{_counts(outcomes)}; {leaks}; exit {code}",
        greeted == count and in_time and leaks.ok and code == 0,
    )


# 3. Trusted peers' headers cut short


def trusted_cut_short_headers() -> Row:
    """A trusted peer's PROXY header cut short by FIN or the timeout is refused, never proxied."""
    per, sniff_timeout = 15, 1.0
    src, dst = ("203.0.113.9", 4444), ("198.51.100.1", 443)
    v1, v2 = build_v1(src, dst), build_v2(src, dst)
    variants: dict[str, tuple[bytes, bool]] = {
        "v1 cut, FIN": (v1[:-2], True),
        "v1 'PROX', FIN": (b"PROX", True),
        "v2 cut, FIN": (v2[:20], True),
        "v2 signature only, FIN": (v2[:12], True),
        "v1 cut, silence": (v1[:-2], False),
        "v2 cut, silence": (v2[:20], False),
    }
    with ExitStack() as stack:
        directory = stack.enter_context(_scratch())
        backend = Backend("echo")
        stack.callback(backend.kill)
        rules = _rules(
            directory,
            f"""
import os
from muxtwist.actions import Proxy
from muxtwist.matchers import Any

sniff_timeout = {sniff_timeout!r}
accept_proxy_protocol = os.environ["MUXREL_TRUST"].split(",")
_backend = Proxy("tcp:host=127.0.0.1:port={backend.port}")
on_timeout = _backend
on_no_match = _backend
rules += [Rule(Any(), _backend)]
""",
        )
        server = stack.enter_context(mux_server({"MUXREL_TRUST": "127.0.0.0/8"}, rules=rules))
        jobs = [(name, data, fin) for name, (data, fin) in variants.items() for _ in range(per)]
        jobs += [("control: whole v1 header", v1 + b"hello\n", True)] * per

        def attack(i: int) -> tuple[str, str]:
            name, data, fin = jobs[i]
            with socket.create_connection(("127.0.0.1", server.port), timeout=sniff_timeout + 5) as s:
                s.sendall(data)
                if fin:
                    s.shutdown(socket.SHUT_WR)
                answer, ending = _read_all(s)
            return name, "proxied" if answer.startswith(b"echo ") else f"refused ({ending})"

        results = _parallel(attack, len(jobs), workers=30)
        leaks = server.leaks()
        code = server.stop()
    by: dict[str, Counter[str]] = {}
    for name, outcome in results:
        by.setdefault(name, Counter())[outcome] += 1
    proxied = sum(c["proxied"] for n, c in by.items() if not n.startswith("control"))
    control = by["control: whole v1 header"]["proxied"]
    cut = len(variants) * per
    return _hostile(
        "Trusted peer's PROXY header cut short",
        "from a trusted peer (127.0.0.0/8), PROXY v1 and v2 headers cut short, then FIN or silence until "
        f"sniff_timeout ({sniff_timeout:g} s); every rule, on_no_match and on_timeout proxy to a backend; "
        "control: the whole header",
        f"{cut} cut-short + {per} control connections",
        f"{proxied}/{cut} cut-short headers proxied; control {control}/{per} proxied",
        "; ".join(f"{n}: {_counts(c)}" for n, c in by.items()) + f"; {leaks}; exit {code}",
        proxied == 0 and control == per and leaks.ok and code == 0,
    )


# 4. Log hygiene


def _v2_unix(path: bytes) -> bytes:
    body = path.ljust(108, b"\0")[:108] + b"/run/dst.sock".ljust(108, b"\0")
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x31, len(body)) + body


def _raw_controls(text: bytes) -> int:
    """Bytes below 0x20 (other than a line's end and tab) and DEL."""
    return sum(1 for b in text if (b < 0x20 and b not in (0x0A, 0x09)) or b == 0x7F)


def log_hygiene() -> list[Row]:
    """Client-derived strings with control bytes never reach the log raw; refusals log at most about a line a second."""
    poison = b"\x1b[2J\x1b[31m\rFORGED line\x07"
    hello = client_hello("api.example.com")
    sni_hello = hello.replace(b"api.example.com", (b"a\x1b[31m\rFORGED" + b"x" * 15)[:15])
    alpn_hello = hello.replace(b"http/1.1", b"h\x1b[2J\r\nFO")
    attacks = {
        "PROXY v2 AF_UNIX path": _v2_unix(b"/tmp/" + poison + b"\nFORGED line") + b"hello\n",
        "PROXY v1 address": b"PROXY TCP4 1.2.3.4" + poison + b" 5.6.7.8 1 2\r\nhello\n",
        "Host header": b"PROXY UNKNOWN\r\nGET / HTTP/1.1\r\nHost: x.test" + poison + b"\r\n\r\n",
        "SNI": b"PROXY UNKNOWN\r\n" + sni_hello,
        "ALPN": b"PROXY UNKNOWN\r\n" + alpn_hello,
    }
    per = 10
    with ExitStack() as stack:
        directory = stack.enter_context(_scratch())
        pem = _certificates(directory)
        rules = _rules(
            directory,
            f"""
import os
from twisted.internet.protocol import Factory
from muxtwist.actions import Reject, TerminateTLS
from muxtwist.default import Echo
from muxtwist.matchers import HTTP1, TLS, Any
from tests.reliability.services import NamedEcho

sniff_timeout = 2.0
log_connections = True
accept_proxy_protocol = os.environ["MUXREL_TRUST"].split(",")
rules += [
    Rule(HTTP1(host="x.test", name="host-x"), Reject()),
    Rule(TLS(), TerminateTLS({{"mux.test": {pem["mux"]!r}}}, Factory.forProtocol(Echo), handshake_timeout=1.0)),
    Rule(Any(), NamedEcho("any")),
]
""",
        )
        server = stack.enter_context(mux_server({"MUXREL_TRUST": "127.0.0.0/8"}, rules=rules))
        before = len(server.log_text().encode())
        jobs = [(name, data) for name, data in attacks.items() for _ in range(per)]

        def attack(i: int) -> None:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                s.sendall(jobs[i][1])
                s.shutdown(socket.SHUT_WR)
                _read_all(s)

        _parallel(attack, len(jobs), workers=10)
        leaks = server.leaks()
        code = server.stop()
        with open(server.log.name, "rb") as f:
            log = f.read()
    written = log[before:]
    raw = _raw_controls(written)
    forged = sum(1 for line in log.splitlines() if line.lstrip().startswith(b"FORGED"))
    # The attacks reached the log, escaped.
    escaped = sum(1 for line in written.splitlines() if b"\\x1b" in line or b"\\u001b" in line)
    injection = _hostile(
        "Control bytes in client-derived log fields",
        "ESC sequences, CR, BEL and newlines in a PROXY v2 AF_UNIX path and a v1 address (trusted peer), a Host "
        "header sent to a Reject rule, an SNI and an ALPN name to TerminateTLS; log_connections on",
        f"{len(jobs)} connections ({len(attacks)} kinds)",
        f"{raw} raw control bytes and {forged} forged lines in {len(written):,} bytes of log; "
        f"{escaped} lines carry the ESC escaped",
        f"{leaks}; exit {code}",
        raw == 0 and forged == 0 and escaped > 0 and leaks.ok and code == 0,
    )
    return [injection, _refusal_flood()]


def _refusal_flood() -> Row:
    limit, seconds = 20, 3.0
    with ExitStack() as stack:
        directory = stack.enter_context(_scratch())
        rules = _rules(directory, f"\nsniff_timeout = 30.0\nmax_connections = {limit}\n")
        server = stack.enter_context(mux_server(rules=rules))
        # Closed before the leak check, whose diagnostics connection needs a place.
        holders = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(limit)]
        for h in holders:
            stack.callback(h.close)
        time.sleep(0.3)
        before = len(server.log_text().encode())
        refused = 0
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                s.settimeout(5)
                try:
                    if s.recv(1) == b"":
                        refused += 1
                except OSError:
                    refused += 1
        elapsed = time.monotonic() - start
        time.sleep(1.2)
        written = server.log_text().encode()[before:]
        lines = written.count(b"\n")
        for h in holders:
            h.close()
        deadline = time.monotonic() + 5
        while not _serving(server.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        leaks = server.leaks()
        code = server.stop()
    rate = len(written) / elapsed
    return _hostile(
        "Refusal log flood",
        f"a connect loop against max_connections = {limit} (held full by silent clients) for {seconds:g} s, "
        "each connection refused and closed",
        f"{refused} refused connections ({refused / elapsed:,.0f}/s)",
        f"{len(written):,} bytes of log ({rate:,.0f} B/s), {lines} lines",
        f"{leaks}; exit {code}",
        refused >= 100 and lines <= seconds + 2 and leaks.ok and code == 0,
    )


# 5. SIGHUP storms


def _catches_sighup(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    except OSError:
        pass
    return False


def _serving(port: int) -> bool:
    """Whether the server on ``port`` answers (with --workers, a worker: the parent's socket accepts before)."""
    try:
        diag(port, timeout=0.5)
        return True
    except (OSError, ValueError):
        return False


def _storm_start(args: Sequence[str], after: float) -> tuple[int | None, int, float, str]:
    """
    Start twistd muxtwist and SIGHUP it every 10 ms from the moment it
    catches SIGHUP until ``after`` seconds past serving: whether it died,
    signals sent, when the handler came (s after spawn), its log.
    """
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            twistd_command("--port", f"tcp:{port}:interface=127.0.0.1", "--config", RULES, *args),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        spawned = time.monotonic()
        try:
            while not _catches_sighup(proc.pid) and proc.poll() is None and time.monotonic() - spawned < 20:
                time.sleep(0.001)
            handler = time.monotonic() - spawned
            sent, until = 0, None
            while proc.poll() is None and time.monotonic() - spawned < 40:
                proc.send_signal(signal.SIGHUP)
                sent += 1
                time.sleep(0.01)
                if until is None and _serving(port):
                    until = time.monotonic() + after
                if until is not None and time.monotonic() > until:
                    break
            died = proc.poll()
            if died is None:
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(30)
            else:
                code = died
        finally:
            stop_group(proc)
        log.seek(0)
        text = log.read().decode(errors="replace")
    return (died if died is not None else (None if code == 0 else code)), sent, handler, text


def sighup_storms() -> list[Row]:
    """SIGHUP every 10 ms during start-up (single and --workers) and under load kills nothing."""
    starts = 4
    single = [_storm_start([], after=0.3) for _ in range(starts)]
    died = [d for d, _, _, _ in single if d is not None]
    workers = _storm_start(["--workers", "2"], after=1.0)
    # Counted before our SIGTERM.
    stormed = workers[3].split("received signal 15", 1)[0]
    worker_deaths = stormed.count("ended: exit code") + stormed.count("starting worker")
    startup = _hostile(
        "SIGHUP storm during start-up",
        "SIGHUP every 10 ms from the moment twistd muxtwist catches SIGHUP (plugin import; earlier the "
        f"interpreter itself is not yet running Python) until 0.3 s after it serves, {starts} starts; then once "
        "with --workers 2 until 1 s after a worker serves (the parent forwards each SIGHUP to starting workers)",
        f"{sum(s for _, s, _, _ in single)} + {workers[1]} SIGHUPs",
        f"{len(died)} of {starts} processes died; with --workers: parent "
        f"{'alive' if workers[0] is None else f'died {workers[0]}'}, {worker_deaths} worker deaths or restarts",
        f"handler in {min(h for _, _, h, _ in single):.2f}-{max(h for _, _, h, _ in single):.2f} s after spawn; "
        "each stopped by SIGTERM with exit 0" + ("" if not died else f"; exits {died}"),
        not died and workers[0] is None and worker_deaths == 0,
    )
    return [startup, _storm_under_load()]


def _storm_under_load() -> Row:
    count, size = 400, 8192
    with mux_server({"MUXREL_SNIFF_TIMEOUT": "10"}) as server:
        stop = threading.Event()
        sent = [0]

        def hup() -> None:
            while not stop.wait(0.01) and server.proc.poll() is None:
                server.proc.send_signal(signal.SIGHUP)
                sent[0] += 1

        thread = threading.Thread(target=hup, daemon=True)
        thread.start()

        def echo(i: int) -> bool:
            body = os.urandom(size)
            with socket.create_connection(("127.0.0.1", server.port), timeout=15) as s:
                s.sendall(b"MUXECHO hello\n" + body)
                s.shutdown(socket.SHUT_WR)
                answer, ending = _read_all(s)
            return ending == "eof" and answer.endswith(b"MUXECHO hello\n" + body) and answer.startswith(b"prefix ")

        try:
            results = _parallel(echo, count, workers=20)
            # On a fast machine the clients can be done before the storm has
            # sent 50 signals: keep exchanging until it has (bounded).
            deadline = time.monotonic() + 20.0
            while sent[0] < 50 and time.monotonic() < deadline and server.proc.poll() is None:
                results += _parallel(echo, 40, workers=20)
        finally:
            stop.set()
            thread.join(5)
        alive = server.proc.poll() is None
        leaks = server.leaks()
        code = server.stop()
        reloads = server.log_text().count("reloaded ")
    failed = results.count(False)
    return _hostile(
        "SIGHUP storm under load",
        f"SIGHUP every 10 ms while {count} or more clients echo {size // 1024} KiB each through one twistd muxtwist",
        f"{sent[0]} SIGHUPs, {len(results)} connections",
        f"{failed} failed exchanges, {reloads} reloads logged, process {'alive' if alive else 'dead'}",
        f"{leaks}; exit {code}",
        failed == 0 and alive and sent[0] >= 50 and leaks.ok and code == 0,
    )


# 6. Host ambiguity


_VHOST = """
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.vhost import NameVirtualHost
from muxtwist.actions import Reject
from muxtwist.matchers import HTTP1


class _Tag(Resource):
    isLeaf = True

    def __init__(self, rule, host):
        super().__init__()
        self.body = f"{rule} {host}\\n".encode()

    def render(self, request):
        return self.body


def _site(rule):
    # Served as nginx serves: by Host (the last one, in twisted.web), a trailing dot ignored.
    vhost = NameVirtualHost()
    vhost.default = _Tag(rule, "default")
    for host in ("admin.internal", "public.test", "a.test"):
        vhost.addHost(host.encode(), _Tag(rule, host))
        vhost.addHost(host.encode() + b".", _Tag(rule, host))
    return Site(vhost)


rules += [
    Rule(HTTP1(host="admin.internal", name="admin"), Reject()),
    Rule(HTTP1(host="a.test", name="a"), _site("a")),
    Rule(HTTP1(name="other"), _site("other")),
]
"""


def host_ambiguity() -> Row:
    """Ambiguous Host requests against a twisted.web vhost: the rule and the host served never disagree."""
    per = 10
    variants = {
        "duplicate Host (admin last)": b"GET / HTTP/1.1\r\nHost: public.test\r\nHost: admin.internal\r\n",
        "duplicate Host (admin first)": b"GET / HTTP/1.1\r\nHost: admin.internal\r\nHost: public.test\r\n",
        "duplicate Host (a first)": b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: public.test\r\n",
        "absolute URI public, Host admin": b"GET http://public.test/ HTTP/1.1\r\nHost: admin.internal\r\n",
        "absolute URI a, Host public": b"GET http://a.test/ HTTP/1.1\r\nHost: public.test\r\n",
        "URL in query, Host admin": b"GET /?x=http://public.test HTTP/1.1\r\nHost: admin.internal\r\n",
        "URL in query, Host public": b"GET /?n=http://a.test HTTP/1.1\r\nHost: public.test\r\n",
        "trailing dot admin": b"GET / HTTP/1.1\r\nHost: admin.internal.\r\n",
        "trailing dot a": b"GET / HTTP/1.1\r\nHost: a.test.\r\n",
        "control: Host a": b"GET / HTTP/1.1\r\nHost: a.test\r\n",
        "control: Host admin": b"GET / HTTP/1.1\r\nHost: admin.internal\r\n",
        "control: Host public": b"GET / HTTP/1.1\r\nHost: public.test\r\n",
    }
    expected_controls = {"control: Host a": "a a.test", "control: Host admin": "rejected"}
    expected_controls["control: Host public"] = "other public.test"
    with ExitStack() as stack:
        directory = stack.enter_context(_scratch())
        server = stack.enter_context(mux_server(rules=_rules(directory, _VHOST)))
        jobs = [(name, head) for name, head in variants.items() for _ in range(per)]

        def ask(i: int) -> tuple[str, str]:
            name, head = jobs[i]
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                s.sendall(head + b"Connection: close\r\n\r\n")
                answer, _ = _read_all(s)
            if not answer:
                return name, "rejected"
            status = answer.split(b"\r\n", 1)[0].decode(errors="replace").split(" ")
            if status[1:2] != ["200"]:
                return name, f"status {' '.join(status[1:2])}"
            return name, answer.rsplit(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip()

        results = _parallel(ask, len(jobs), workers=20)
        leaks = server.leaks()
        code = server.stop()
    by: dict[str, Counter[str]] = {}
    for name, seen in results:
        by.setdefault(name, Counter())[seen] += 1

    def rule_host(seen: str) -> tuple[str, str]:
        parts = seen.split(" ")
        return (parts[0], parts[1]) if len(parts) == 2 else (seen, "")

    # A host rule (a.test) given a request its server serves as another host.
    bad = sum(
        n for c in by.values() for seen, n in c.items() if rule_host(seen)[0] == "a" and rule_host(seen)[1] != "a.test"
    )
    # Requests no host rule matched, served as admin.internal by the catch-all's server: the documented
    # limit of host rules (docs/security.md: access control belongs to the server behind).
    fell = sum(n for c in by.values() for seen, n in c.items() if rule_host(seen) == ("other", "admin.internal"))
    controls_ok = all(by[name] == Counter({want: per}) for name, want in expected_controls.items())
    attacks = len(variants) - len(expected_controls)
    return _hostile(
        "Host ambiguity behind the mux",
        "duplicate Host, an absolute URI whose host differs from Host, a URL in the query string and a trailing "
        "dot, against Rule(HTTP1(host='admin.internal'), Reject()), a rule for a.test and a catch-all, each in "
        "front of a twisted.web NameVirtualHost that names the rule and the host it served",
        f"{attacks * per} ambiguous + {len(expected_controls) * per} control requests ({attacks} kinds)",
        f"{bad} requests a host rule took while its server served another host; {fell} ambiguous requests "
        "matched no host rule and were served as admin.internal by the catch-all's server (the documented "
        "limit: host rules are not access control, docs/security.md)",
        "; ".join(f"{n}: {_counts(c)}" for n, c in by.items()) + f"; {leaks}; exit {code}",
        bad == 0 and controls_ok and leaks.ok and code == 0,
    )


# 7. Echo backpressure


def echo_backpressure() -> Row:
    """Clients writing to the built-in Echo without reading keep the server's memory bounded."""
    clients, seconds, cap = 4, 3.0, 256 << 20
    bound = 16 << 10  # KiB
    with ExitStack() as stack:
        directory = stack.enter_context(_scratch())
        rules = _rules(
            directory,
            """
from twisted.internet.protocol import Factory
from muxtwist.default import Echo
from muxtwist.matchers import Any

rules += [Rule(Any(), Factory.forProtocol(Echo), name="echo")]
""",
        )
        server = stack.enter_context(mux_server(rules=rules))
        rss0 = server.state()["rss_kib"]
        chunk = os.urandom(1 << 20)

        def flood(i: int) -> int:
            written = 0
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
                s.setblocking(False)
                end = time.monotonic() + seconds
                while time.monotonic() < end and written < cap:
                    try:
                        written += s.send(chunk)
                    except BlockingIOError:
                        time.sleep(0.005)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return written

        with Sampler(server.pid) as sampler:
            written = _parallel(flood, clients, workers=clients)
        grown = sampler.peak_rss - rss0
        leaks = server.leaks()
        code = server.stop()
    total = sum(written)
    return _hostile(
        "Echo without reading",
        f"clients that write to the built-in Echo (muxtwist.default.Echo) as fast as they can for {seconds:g} s "
        "and never read",
        f"{clients} connections, {total / 2**20:.1f} MiB written in all",
        f"server resident memory +{grown:,} KiB at the peak (bound {bound:,} KiB)",
        f"{leaks}; exit {code}",
        grown <= bound and total > 0 and leaks.ok and code == 0,
    )


# 8. Stalled TLS handshakes


def stalled_handshakes() -> Row:
    """Stalled handshakes beyond max_handshakes and max_handshakes_per_source are refused at once; memory bounded."""
    overall, per_source, timeout = 150, 50, 2.0
    sources, per = [f"127.0.0.{i}" for i in range(1, 7)], 60
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    with ExitStack() as stack:
        directory = stack.enter_context(_scratch())
        pem = _certificates(directory)
        rules = _rules(
            directory,
            f"""
from twisted.internet.protocol import Factory
from muxtwist.actions import TerminateTLS
from muxtwist.default import Echo
from muxtwist.matchers import TLS

rules += [
    Rule(TLS(), TerminateTLS({{"DEFAULT": {pem["mux"]!r}}}, Factory.forProtocol(Echo), handshake_timeout={timeout!r},
                             max_handshakes={overall}, max_handshakes_per_source={per_source})),
]
""",
        )
        server = stack.enter_context(mux_server(rules=rules))
        hello = client_hello("mux.test")
        rss0 = server.state()["rss_kib"]
        sel = selectors.DefaultSelector()
        opened: dict[socket.socket, tuple[str, float]] = {}
        ended: list[tuple[str, float]] = []
        with Sampler(server.pid) as sampler:
            for source in sources:
                for _ in range(per):
                    s = socket.socket()
                    s.bind((source, 0))
                    s.connect(("127.0.0.1", server.port))
                    s.sendall(hello)
                    s.setblocking(False)
                    sel.register(s, selectors.EVENT_READ)
                    opened[s] = (source, time.monotonic())
            deadline = time.monotonic() + timeout + 5
            while opened and time.monotonic() < deadline:
                for key, _ in sel.select(0.05):
                    s = key.fileobj  # type: ignore[assignment]
                    try:
                        data = s.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        source, started = opened.pop(s)
                        ended.append((source, time.monotonic() - started))
                        sel.unregister(s)
                        s.close()
        for s in opened:
            s.close()
        sel.close()
        grown = sampler.peak_rss - rss0
        leaks = server.leaks()
        code = server.stop()
    refused = [t for _, t in ended if t < timeout * 0.5]
    held = [(src, t) for src, t in ended if t >= timeout * 0.5]
    held_by = Counter(src for src, _ in held)
    total = len(sources) * per
    bound = overall * 128  # KiB: about 70 KiB a stalled handshake, with room
    per_held = grown * 1024 // max(1, len(held))
    return _hostile(
        "Stalled TLS handshakes",
        f"connections from {len(sources)} source addresses ({per} each) that send a ClientHello and stall, against "
        f"TerminateTLS(max_handshakes={overall}, max_handshakes_per_source={per_source}, "
        f"handshake_timeout={timeout:g})",
        f"{total} connections",
        f"{len(held)} held until the timeout, {len(refused)} refused at once; server +{grown:,} KiB at the peak "
        f"({per_held:,} bytes a held handshake; bound {bound:,} KiB)",
        f"held per source {dict(sorted(held_by.items()))}; {len(opened)} never closed; "
        f"held for {min((t for _, t in held), default=0):.2f}-{max((t for _, t in held), default=0):.2f} s; "
        f"{leaks}; exit {code}",
        len(held) <= overall
        and all(n <= per_source for n in held_by.values())
        and len(held) + len(refused) == total
        and grown <= bound
        and leaks.ok
        and code == 0,
    )
