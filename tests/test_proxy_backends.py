"""
Choosing backends: balancing, passive and active health checks, TLS to
backends, PROXY headers over IPv6, the Proxy's own validation, and the
rate-limited log lines of a backend's failures.
"""

from __future__ import annotations

import random
import socket
from typing import Any

from twisted.internet import ssl, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionRefusedError as Refused
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest

from muxtwist import ConnectionInfo, Rule
from muxtwist.actions import HealthCheck, Proxy
from muxtwist.matchers import Any as AnyMatcher
from muxtwist.matchers.proxy_protocol import parse
from muxtwist.proxy._backends import _host_of
from tests.certs import make_ca, make_certificate
from tests.test_proxy import capture_logs, logged
from tests.test_proxy_support import (
    Echo,
    Peer,
    PeerFactory,
    R,
    backend,
    connect,
    free_port,
    mux,
    open_fds,
    until,
    wait,
)

A, B, C = (f"tcp:host=127.0.0.1:port={p}" for p in (1001, 1002, 1003))


def firsts(proxy: Proxy, n: int, info: ConnectionInfo | None = None) -> list[str]:
    return [proxy.candidates(info or ConnectionInfo())[0].description for _ in range(n)]


def client_from(host: str) -> ConnectionInfo:
    return ConnectionInfo(peer=IPv4Address("TCP", host, 1234))


class BalanceTests(unittest.TestCase):
    def test_round_robin(self) -> None:
        """round_robin starts each connection at the next backend, the others following as fallbacks."""
        proxy = Proxy([A, B, C])
        self.assertEqual(firsts(proxy, 6), [A, B, C, A, B, C])
        self.assertEqual([b.description for b in proxy.candidates(ConnectionInfo())], [A, B, C])

    def test_least_conn(self) -> None:
        """least_conn picks the backend with the fewest open relays."""
        proxy = Proxy([A, B, C], balance="least_conn")
        for b, active in zip(proxy.backends, (2, 0, 1), strict=True):
            b.stats.active = active
        self.assertEqual([b.description for b in proxy.candidates(ConnectionInfo())], [B, C, A])

    def test_first_is_ordered_failover(self) -> None:
        """first always prefers the first usable backend, in the order given."""
        proxy = Proxy([A, B, C], balance="first")
        self.assertEqual(firsts(proxy, 3), [A, A, A])
        proxy.backends[0].down_until = R.seconds() + 60
        self.assertEqual([b.description for b in proxy.candidates(ConnectionInfo())], [B, C])

    def test_random(self) -> None:
        """random spreads connections over every backend, each candidate list a permutation."""
        proxy = Proxy([A, B, C], balance="random")
        proxy._random = random.Random(4)
        seen = firsts(proxy, 300)
        self.assertEqual(set(seen), {A, B, C})
        self.assertTrue(all(seen.count(x) > 50 for x in (A, B, C)))
        self.assertEqual(sorted(b.description for b in proxy.candidates(ConnectionInfo())), [A, B, C])

    def test_source_hash(self) -> None:
        """source_hash sends a client host to the same backend every time, and different hosts over all of them."""
        proxy = Proxy([A, B, C], balance="source_hash")
        for host in ("192.0.2.1", "198.51.100.20", "2001:db8::1"):
            self.assertEqual(len(set(firsts(proxy, 5, client_from(host)))), 1)
        spread = {proxy.candidates(client_from(f"10.0.0.{i}"))[0].description for i in range(50)}
        self.assertEqual(spread, {A, B, C})
        info = client_from("192.0.2.1")
        chosen = proxy.candidates(info)[0]
        chosen.stats.healthy = False
        self.assertNotEqual(proxy.candidates(info)[0], chosen)

    def test_all_down_still_tried(self) -> None:
        """When every backend is marked down they are all tried anyway, so service returns with the first one back."""
        proxy = Proxy([A, B])
        for b in proxy.backends:
            b.stats.healthy = False
        self.assertEqual(len(proxy.candidates(ConnectionInfo())), 2)

    def test_validation(self) -> None:
        """Bad arguments are refused at construction with a clear error."""
        for kwargs, error in (
            ({"balance": "fastest"}, ValueError),
            ({"proxy_protocol": 3}, ValueError),
            ({"connect_timeout": 0}, ValueError),
            ({"tls": 42}, TypeError),
            ({"health_check": {"interval": 1}}, TypeError),
        ):
            with self.assertRaises(error, msg=kwargs):
                Proxy(A, **kwargs)
        with self.assertRaises(ValueError):
            Proxy([])
        with self.assertRaises(ValueError):
            Proxy("nonsense:x=1")
        with self.assertRaises(ValueError):
            Proxy("unix:path=/tmp/x", tls=True)
        with self.assertRaises(ValueError):
            HealthCheck(interval=0)

    def test_host_of(self) -> None:
        """The hostname for tls=True comes from the description's host=, escapes undone."""
        self.assertEqual(_host_of("tcp:host=db.example.com:port=5432"), "db.example.com")
        self.assertEqual(_host_of(r"tcp6:port=1:host=2001\:db8\:\:1"), "2001:db8::1")
        self.assertIsNone(_host_of("unix:path=/x"))


class PassiveHealthTests(unittest.TestCase):
    async def test_failing_backend_skipped_for_a_while(self) -> None:
        """After max_fails refused connects in a row a backend is skipped, then tried again after fail_timeout."""
        events = capture_logs(self)
        dead = f"tcp:host=127.0.0.1:port={free_port()}"
        live, _ = backend(self)
        proxy = Proxy([dead, live], balance="first", max_fails=2, fail_timeout=0.3)
        port, _ = mux(self, [Rule(AnyMatcher(), proxy)])

        async def one() -> None:
            client = await connect(self, port)
            client.transport.write(b"x")  # type: ignore[union-attr]
            await client.received_at_least(1)
            client.transport.loseConnection()  # type: ignore[union-attr]

        for _ in range(4):
            await one()
        self.assertEqual(proxy.stats[dead].errors, {"refused": 2})
        self.assertEqual(len(logged(events, "skipped for")), 1)
        await until(lambda: proxy.backends[0].down_until <= R.seconds(), 2)
        await one()
        self.assertEqual(proxy.stats[dead].errors, {"refused": 3})
        self.assertEqual(proxy.stats[live].total, 5)


class FailureLogTests(unittest.TestCase):
    """A dead backend behind a connect loop: its log lines, on a clock."""

    DEAD = "tcp:host=127.0.0.1:port=17999"

    def setUp(self) -> None:
        self.events = capture_logs(self)
        self.reactor = MemoryReactorClock()
        self.proxy = Proxy(self.DEAD, reactor=self.reactor, max_fails=10**6)

    def refused(self, source: object) -> None:
        """One client from ``source`` whose connect to the dead backend is refused."""
        relay = self.proxy.buildProtocolForConnection(None, ConnectionInfo(peer=source), "down")  # type: ignore[arg-type]
        assert relay is not None
        relay.makeConnection(StringTransport())
        factory = self.reactor.tcpClients[-1][2]
        factory.clientConnectionFailed(self.reactor.connectors[-1], Failure(Refused()))

    def lines(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return logged(self.events, "failed for"), logged(self.events, "could take")

    def test_burst_logs_one_line_each_then_the_count(self) -> None:
        """100 refused connects in a second log one failure and one gave-up line, then the other 99 counted."""
        for i in range(100):
            self.refused(IPv4Address("TCP", "10.0.0.5", 40000 + i))
            self.reactor.advance(0.005)
        failures, gave_up = self.lines()
        self.assertEqual((len(failures), len(gave_up)), (1, 1))
        first = formatEvent(failures[0])
        self.assertIn("10.0.0.5:40000", first)
        self.assertIn("refused", first)
        self.assertIn("10.0.0.5:40000", formatEvent(gave_up[0]))
        self.assertNotIn("IPv4Address", first + formatEvent(gave_up[0]))
        self.reactor.advance(1)
        failures, gave_up = self.lines()
        self.assertEqual((len(failures), len(gave_up)), (2, 2))
        for line in (failures[1], gave_up[1]):
            self.assertEqual(line["suppressed"], 99)
            self.assertIn("99 more", formatEvent(line))
            self.assertIn("10.0.0.5:40099", formatEvent(line))
        self.reactor.advance(10)
        self.assertEqual(self.lines(), ([failures[0], failures[1]], [gave_up[0], gave_up[1]]))
        # Metrics count every one.
        self.assertEqual(self.proxy.stats[self.DEAD].errors, {"refused": 100})
        self.assertEqual(self.proxy.gave_up, 100)

    def test_max_connections_refusals_are_one_line_a_second_with_the_count(self) -> None:
        """A full proxy refusing 50 clients in a second logs one line, then the 49 others counted, as host:port."""
        full = Proxy(self.DEAD, reactor=self.reactor, max_connections=1)
        held = full.buildProtocolForConnection(None, ConnectionInfo(peer=IPv4Address("TCP", "10.0.0.8", 1)), "full")  # type: ignore[arg-type]
        assert held is not None
        held.makeConnection(StringTransport())  # the one relay it may hold, connecting
        for i in range(50):
            relay = full.buildProtocolForConnection(
                None,  # type: ignore[arg-type]
                ConnectionInfo(peer=IPv4Address("TCP", "10.0.0.8", 30000 + i)),
                "full",
            )
            self.assertIsNone(relay)
            self.reactor.advance(0.01)
        self.reactor.advance(1)
        lines = [formatEvent(e) for e in logged(self.events, "max_connections")]
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("refusing 10.0.0.8:30000: max_connections (1) reached", lines[0])
        self.assertIn("refused 49 more clients", lines[1])
        self.assertIn("10.0.0.8:30049", lines[1])
        self.assertEqual(full.gave_up, 50)

    def test_first_failure_after_quiet_is_logged_at_once_with_reason(self) -> None:
        """After a quiet second the next failure is logged at once, with its reason and client, and no count."""
        self.refused(IPv4Address("TCP", "10.0.0.5", 1))
        self.reactor.advance(5)
        self.refused(IPv6Address("TCP", "2001:db8::7", 2))
        failures, gave_up = self.lines()
        self.assertEqual((len(failures), len(gave_up)), (2, 2))
        self.assertEqual(failures[1]["kind"], "refused")
        self.assertEqual(failures[1]["suppressed"], 0)
        self.assertIn("[2001:db8::7]:2", formatEvent(failures[1]))
        self.assertNotIn("more", formatEvent(failures[1]))

    def test_steady_failures_once_a_second_every_one_counted(self) -> None:
        """Failures every 10 ms for 3 s give about a line a second per kind, the lines accounting for every one."""
        for i in range(300):
            self.refused(IPv4Address("TCP", "10.0.0.5", i))
            self.reactor.advance(0.01)
        self.reactor.advance(2)
        for lines in self.lines():
            self.assertIn(len(lines), range(3, 6))
            # A line about one client stands for it and the count it carries; a count line only for that count.
            own = sum(1 for line in lines if "more clients" not in line["log_format"])
            self.assertEqual(sum(line["suppressed"] for line in lines) + own, 300, lines)

    def test_client_address_escaped(self) -> None:
        """A client's UNIX path (a PROXY header's claim) is written escaped, on one line."""
        self.refused(UNIXAddress(b"/run/a\nforged\x1b"))
        text = formatEvent(self.lines()[0][0]) + formatEvent(self.lines()[1][0])
        self.assertNotIn("\n", text)
        self.assertIn("/run/a\\x0aforged\\x1b", text)

    def test_stop_logs_the_pending_count(self) -> None:
        """Stopping the proxy logs the counts still pending at once, and nothing more when their second ends."""
        self.proxy.doStart()
        for i in range(3):
            self.refused(IPv4Address("TCP", "10.0.0.5", i))
        self.proxy.doStop()
        failures, gave_up = self.lines()
        self.assertEqual([line["suppressed"] for line in failures], [0, 2])
        self.assertEqual([line["suppressed"] for line in gave_up], [0, 2])
        self.reactor.advance(1)
        self.assertEqual(len(self.lines()[0]), 2)


class ActiveHealthTests(unittest.TestCase):
    async def test_rise_and_fall(self) -> None:
        """A backend failing `fall` checks is marked down and comes back after `rise` passing ones."""
        events = capture_logs(self)
        factory = PeerFactory(_Ponger)
        listening = R.listenTCP(0, factory, interface="127.0.0.1")
        port = listening.getHost().port
        desc = f"tcp:host=127.0.0.1:port={port}"
        proxy = Proxy(
            desc,
            health_check=HealthCheck(interval=0.02, timeout=0.5, rise=3, fall=2, send=b"PING\r\n", expect=b"+PONG"),
        )
        proxy.doStart()
        self.addCleanup(proxy.doStop)
        await until(lambda: proxy.backends[0]._checks_passed >= 2)
        self.assertTrue(proxy.stats[desc].healthy)
        await listening.stopListening()
        await until(lambda: not proxy.stats[desc].healthy)
        self.assertEqual(len(logged(events, "is down")), 1)
        listening = R.listenTCP(port, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        await until(lambda: proxy.stats[desc].healthy)
        self.assertEqual(len(logged(events, "healthy again")), 1)

    async def test_wrong_answer_and_hang_fail(self) -> None:
        """A backend that answers the wrong bytes, or whose connect hangs, fails its checks within the timeout."""
        wrong, _ = backend(self, Echo)
        hung = socket.socket()
        self.addCleanup(hung.close)
        hung.bind(("127.0.0.1", 0))
        hung.listen(0)
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(hung.getsockname())
            self.addCleanup(s.close)
        hung_desc = f"tcp:host=127.0.0.1:port={hung.getsockname()[1]}"
        proxy = Proxy(
            [wrong, hung_desc],
            health_check=HealthCheck(interval=0.02, timeout=0.2, rise=1, fall=1, send=b"PING\r\n", expect=b"+PONG"),
        )
        proxy.doStart()
        self.addCleanup(proxy.doStop)
        await until(lambda: not any(s.healthy for s in proxy.stats.values()))

    async def test_stop_leaves_nothing(self) -> None:
        """doStop cancels every check timer and in-flight probe: no delayed call or descriptor is left."""
        await until(lambda: True)  # a reactor turn, so its own lazily made descriptors exist before counting
        await task.deferLater(R, 0.01, lambda: None)
        fds = open_fds()
        calls = len(R.getDelayedCalls())
        hung = socket.socket()
        hung.bind(("127.0.0.1", 0))
        hung.listen(0)
        fillers = []
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(hung.getsockname())
            fillers.append(s)
        proxy = Proxy(
            f"tcp:host=127.0.0.1:port={hung.getsockname()[1]}", health_check=HealthCheck(interval=0.01, timeout=5)
        )
        proxy.doStart()
        await until(lambda: proxy.backends[0]._probe is not None and proxy.backends[0]._probe._attempt is not None)
        proxy.doStop()
        for s in [*fillers, hung]:
            s.close()
        await until(lambda: open_fds() <= fds, 5)
        self.assertEqual(len(R.getDelayedCalls()), calls)


class _Ponger(Peer):
    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if b"PING\r\n" in self.received:
            self.transport.write(b"+PONG\r\n")  # type: ignore[union-attr]


def _tls_backend(case: unittest.TestCase, *names: str) -> tuple[int, Any, PeerFactory]:
    ca = make_ca()
    leaf = make_certificate(*names, ca=ca)
    options = ssl.PrivateCertificate.loadPEM(leaf.key_pem + leaf.cert_pem).options()
    factory = PeerFactory(Echo)
    port = R.listenSSL(0, factory, options, interface="127.0.0.1")
    case.addCleanup(port.stopListening)

    def close_all() -> None:
        for p in factory.built:
            if p.transport is not None and not p.lost.called:
                p.transport.abortConnection()  # type: ignore[attr-defined]

    case.addCleanup(close_all)
    return port.getHost().port, ssl.Certificate.loadPEM(ca.cert_pem), factory


class TLSBackendTests(unittest.TestCase):
    async def test_verified_tls_relay(self) -> None:
        """With tls= options trusting the backend's CA, bytes are relayed over verified TLS."""
        port, ca, factory = _tls_backend(self, "backend.test")
        proxy = Proxy(f"tcp:host=127.0.0.1:port={port}", tls=ssl.optionsForClientTLS("backend.test", trustRoot=ca))
        front, _ = mux(self, [Rule(AnyMatcher(), proxy)])
        client = await connect(self, front)
        client.transport.write(b"over tls")  # type: ignore[union-attr]
        self.assertEqual(await client.received_at_least(8), b"over tls")
        self.assertEqual(bytes(factory.built[0].received), b"over tls")

    async def test_untrusted_certificate_clear_error(self) -> None:
        """A backend certificate that does not verify is a clear logged TLS error, and the client is closed."""
        events = capture_logs(self)
        port, _, factory = _tls_backend(self, "backend.test")
        desc = f"tcp:host=127.0.0.1:port={port}"
        proxy = Proxy(desc, tls="backend.test")
        front, _ = mux(self, [Rule(AnyMatcher(), proxy)])
        client = await connect(self, front)
        client.transport.write(b"secret")  # type: ignore[union-attr]
        await client.closed()
        self.assertEqual(bytes(client.received), b"")
        (failure,) = logged(events, "failed for")
        self.assertEqual(failure["kind"], "tls")
        self.assertIn("certificate verification failed", failure["problem"])
        self.assertEqual(proxy.stats[desc].errors, {"tls": 1})
        self.assertTrue(all(p.received == b"" for p in factory.built))

    async def test_wrong_hostname_clear_error(self) -> None:
        """A trusted certificate for another name is refused with an error naming the mismatch; nothing is sent."""
        events = capture_logs(self)
        port, ca, factory = _tls_backend(self, "other.test")
        proxy = Proxy(f"tcp:host=127.0.0.1:port={port}", tls=ssl.optionsForClientTLS("backend.test", trustRoot=ca))
        front, _ = mux(self, [Rule(AnyMatcher(), proxy)])
        client = await connect(self, front)
        client.transport.write(b"secret")  # type: ignore[union-attr]
        await client.closed()
        (failure,) = logged(events, "failed for")
        self.assertEqual(failure["kind"], "tls")
        self.assertIn("does not match", failure["problem"])
        self.assertTrue(all(p.received == b"" for p in factory.built))


class IPv6Tests(unittest.TestCase):
    async def test_proxy_header_over_ipv6(self) -> None:
        """A client on ::1 reaches the backend as a TCP6 PROXY header with its own address and our listening one."""
        desc, recorded = backend(self, Peer)
        from muxtwist import SniffingFactory

        factory = SniffingFactory([Rule(AnyMatcher(), Proxy(desc, proxy_protocol=1))])
        listening = R.listenTCP(0, factory, interface="::1")
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        client = await connect(self, port, host="::1")
        client.transport.write(b"hi")  # type: ignore[union-attr]
        server = await wait(recorded.arrived)
        data = await server.received_at_least(len(b"PROXY TCP6 ::1 ::1 1 1\r\nhi"))
        header = parse(data)
        assert header is not None and isinstance(header.source, tuple)
        self.assertEqual(header.family, "TCP6")
        self.assertEqual(header.source, ("::1", client.transport.getHost().port))  # type: ignore[union-attr]
        self.assertEqual(header.destination, ("::1", port))
        self.assertTrue(data.endswith(b"hi"))
        client.transport.loseConnection()  # type: ignore[union-attr]
        await wait(client.lost)
        factory.abort_all()
        await wait(factory.when_idle())


class OutgoingHeaderTests(unittest.TestCase):
    """The PROXY header a Proxy sends when the connection came with a trusted one."""

    async def header_seen(self, incoming: bytes, version: int) -> Any:
        """The header a backend of ``Proxy(proxy_protocol=version)`` gets for a client that sent ``incoming`` first."""
        desc, recorded = backend(self, Peer)
        port, _ = mux(
            self,
            [Rule(AnyMatcher(), Proxy(desc, proxy_protocol=version))],
            accept_proxy_protocol=["127.0.0.1/32"],
        )
        client = await connect(self, port)
        client.transport.write(incoming + b"hello")  # type: ignore[union-attr]
        server = await wait(recorded.arrived)
        await until(lambda: bytes(server.received).endswith(b"hello"))
        header = parse(bytes(server.received))
        assert header is not None
        self.assertEqual(bytes(server.received)[header.length :], b"hello")
        return header, port, client

    async def test_trusted_destination_is_passed_on(self) -> None:
        """Both ends of a trusted incoming header reach the backend, in v1 and v2, not our listening address."""
        for version in (1, 2):
            incoming = b"PROXY TCP4 203.0.113.7 198.51.100.9 5555 443\r\n"
            header, _, _ = await self.header_seen(incoming, version)
            self.assertEqual(
                (header.version, header.source, header.destination),
                (version, ("203.0.113.7", 5555), ("198.51.100.9", 443)),
            )

    async def test_trusted_ipv6_destination_is_passed_on(self) -> None:
        """An IPv6 trusted header is passed on as TCP6 with its own destination."""
        header, _, _ = await self.header_seen(b"PROXY TCP6 2001:db8::7 2001:db8::1 5555 8443\r\n", 2)
        self.assertEqual((header.source, header.destination), (("2001:db8::7", 5555), ("2001:db8::1", 8443)))

    async def test_local_header_keeps_our_addresses(self) -> None:
        """A trusted UNKNOWN header leaves the balancer as source and our listening address as destination."""
        header, port, client = await self.header_seen(b"PROXY UNKNOWN\r\n", 1)
        self.assertEqual(header.source, ("127.0.0.1", client.transport.getHost().port))  # type: ignore[union-attr]
        self.assertEqual(header.destination, ("127.0.0.1", port))
