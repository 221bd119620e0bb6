"""
Tests for muxtwist.service.MuxService on real loopback sockets: listeners,
the graceful stop and reloading the rules file.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.trial import unittest

from muxtwist import MuxService, Rule, SniffingFactory
from muxtwist.matchers import Prefix


class Dribbler(protocol.Protocol):
    """On 'SLOW n', writes n numbered chunks 50 ms apart, then closes; on 'STUCK', never answers."""

    def dataReceived(self, data: bytes) -> None:
        if data.startswith(b"SLOW"):
            self.left = int(data.split()[1])
            self.sent = 0
            self.tick()

    def tick(self) -> None:
        if self.sent == self.left:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.transport.write(b"chunk %d\n" % self.sent)  # type: ignore[union-attr]
        self.sent += 1
        self.call = reactor.callLater(0.05, self.tick)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Any = None) -> None:
        call = getattr(self, "call", None)
        if call is not None and call.active():
            call.cancel()


class Client(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(self.received)


async def connect(port: int, send: bytes) -> Client:
    client = Client()
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await endpoints.connectProtocol(endpoint, client)
    if send:
        client.transport.write(send)  # type: ignore[union-attr]
    return client


def port_of(service: MuxService) -> int:
    (listener,) = service.listeners.values()
    port: int = listener._waitingForPort.result.getHost().port  # type: ignore[union-attr]
    return port


class StopTests(unittest.TestCase):
    def make_service(self, shutdown_timeout: float) -> MuxService:
        service = MuxService(shutdown_timeout=shutdown_timeout)
        factory = SniffingFactory([Rule(Prefix(b"SLOW", b"STUCK"), protocol.Factory.forProtocol(Dribbler))])
        service.add_listener("tcp:0:interface=127.0.0.1", factory)
        service.startService()
        return service

    @defer.inlineCallbacks
    def test_transfer_in_flight_completes(self) -> Any:
        """A handed-off transfer still running at stop finishes intact before stopService fires."""
        service = self.make_service(shutdown_timeout=10)
        client = yield defer.Deferred.fromCoroutine(connect(port_of(service), b"SLOW 6"))
        yield task.deferLater(reactor, 0.08, lambda: None)
        stopped = service.stopService()
        self.assertFalse(stopped.called)
        received = yield client.lost
        yield stopped
        self.assertEqual(received, b"".join(b"chunk %d\n" % i for i in range(6)))
        self.assertEqual(service.connections, [])

    @defer.inlineCallbacks
    def test_stuck_connection_aborted_at_deadline(self) -> Any:
        """A connection that does not finish is aborted at shutdown_timeout, and only then does stop fire."""
        service = self.make_service(shutdown_timeout=0.3)
        client = yield defer.Deferred.fromCoroutine(connect(port_of(service), b"STUCK"))
        yield task.deferLater(reactor, 0.05, lambda: None)
        started = reactor.seconds()  # type: ignore[attr-defined]
        yield service.stopService()
        elapsed = reactor.seconds() - started  # type: ignore[attr-defined]
        self.assertGreaterEqual(elapsed, 0.29)
        self.assertLess(elapsed, 5)
        yield client.lost
        self.assertEqual(service.connections, [])

    @defer.inlineCallbacks
    def test_sniffing_connection_aborted_at_once(self) -> Any:
        """A connection still sniffing at stop is aborted at once and stop does not wait for it."""
        service = self.make_service(shutdown_timeout=30)
        client = yield defer.Deferred.fromCoroutine(connect(port_of(service), b"SL"))
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(service.connections), 1)
        yield service.stopService()
        yield client.lost
        self.assertEqual(client.received, b"")

    @defer.inlineCallbacks
    def test_stop_refuses_new_connections(self) -> Any:
        """Once stopped, the port accepts no more connections."""
        service = self.make_service(shutdown_timeout=1)
        port = port_of(service)
        yield service.stopService()
        from twisted.internet.error import ConnectionRefusedError

        with self.assertRaises(ConnectionRefusedError):
            yield defer.Deferred.fromCoroutine(connect(port, b""))


class ReloadTests(unittest.TestCase):
    def write(self, path: str, body: str) -> None:
        with open(path, "w") as f:
            f.write(body)

    @defer.inlineCallbacks
    def test_reload_new_rules_for_new_connections(self) -> Any:
        """After a reload new connections get the new rules, live ones keep theirs, a broken file changes nothing."""
        path = os.path.abspath(self.mktemp() + "-rules.py")
        rules = """
            from twisted.internet.protocol import Factory, Protocol
            from muxtwist import Rule
            from muxtwist.matchers import Prefix
            class Say(Protocol):
                def dataReceived(self, data):
                    self.transport.write(WORD)
                    self.transport.loseConnection()
            rules = [Rule(Prefix(b"HI"), Factory.forProtocol(Say))]
            sniff_timeout = 2
        """
        rules = textwrap.dedent(rules)
        self.write(path, rules + "WORD = b'old'\n")
        from muxtwist.config import load_config

        service = MuxService(config_path=path, ports=("tcp:0:interface=127.0.0.1",))
        service.load(load_config(path))
        service.startService()
        self.addCleanup(service.stopService)
        port = port_of(service)
        sniffing = yield defer.Deferred.fromCoroutine(connect(port, b"H"))
        self.write(path, rules + "WORD = b'new'\n")
        self.assertTrue(service.reload())
        fresh = yield defer.Deferred.fromCoroutine(connect(port, b"HI"))
        self.assertEqual((yield fresh.lost), b"new")
        sniffing.transport.write(b"I")  # type: ignore[union-attr]
        self.assertEqual((yield sniffing.lost), b"old")
        self.write(path, "rules = [\n")
        self.assertFalse(service.reload())
        again = yield defer.Deferred.fromCoroutine(connect(port, b"HI"))
        self.assertEqual((yield again.lost), b"new")
        self.assertEqual(len(self.flushLoggedErrors()), 0)


class RuleNameTests(unittest.TestCase):
    """Rule names are unique per rule list; ``name=None`` means the default name."""

    def test_name_none_means_the_matchers_name(self) -> None:
        """Rule(..., name=None) is named after its matcher, like a Rule given no name."""
        factory = protocol.Factory.forProtocol(protocol.Protocol)
        self.assertEqual(Rule(Prefix(b"A"), factory, name=None).name, "prefix")
        self.assertEqual(Rule(Prefix(b"A"), factory).name, "prefix")
        self.assertEqual(Rule(Prefix(b"A"), factory, name="a").name, "a")

    def test_rules_sharing_a_name_are_refused_naming_both(self) -> None:
        """Two rules with the same (default) name make SniffingFactory raise, naming both rules."""
        factory = protocol.Factory.forProtocol(protocol.Protocol)
        rules = [Rule(Prefix(b"A"), factory), Rule(Prefix(b"Z"), factory, name="z"), Rule(Prefix(b"B"), factory)]
        with self.assertRaises(ValueError) as caught:
            SniffingFactory(rules)
        message = str(caught.exception)
        self.assertIn("rules 0 (matcher Prefix(", message)
        self.assertIn("and 2 (matcher Prefix(", message)
        self.assertIn("'prefix'", message)
        SniffingFactory([Rule(Prefix(b"A"), factory, name="a"), Rule(Prefix(b"B"), factory, name="b")])

    def test_reserved_rule_names_are_refused(self) -> None:
        """A rule may not take the name the sniffer counts on_timeout or on_no_match under."""
        factory = protocol.Factory.forProtocol(protocol.Protocol)
        with self.assertRaises(ValueError):
            SniffingFactory([Rule(Prefix(b"A"), factory, name="on_no_match")])

    def test_rules_file_with_shared_names_is_one_error_with_file_and_lines(self) -> None:
        """The loader refuses a rules file whose rules share a name, naming the file and both rules' lines."""
        from muxtwist.config import ConfigError, load_config

        path = os.path.abspath(self.mktemp() + "-rules.py")
        with open(path, "w") as f:
            f.write(
                textwrap.dedent("""\
                    from twisted.internet.protocol import Factory, Protocol
                    from muxtwist import Rule
                    from muxtwist.matchers import TLS
                    rules = [
                        Rule(TLS(sni="a.test"), Factory.forProtocol(Protocol)),
                        Rule(TLS(sni="b.test"), Factory.forProtocol(Protocol)),
                    ]
                """)
            )
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertEqual(caught.exception.line, 6)
        self.assertEqual(
            str(caught.exception),
            f"{path}:6: rules[1] is named 'tls' like rules[0] (line 5); rule names must be unique: give one a name=",
        )

    def test_reload_to_shared_names_keeps_the_running_rules(self) -> None:
        """A reload to a file whose rules share a name fails and changes nothing."""
        path = os.path.abspath(self.mktemp() + "-rules.py")
        head = "from twisted.internet.protocol import Factory, Protocol\nfrom muxtwist import Rule\n"
        head += "from muxtwist.matchers import Prefix\nf = Factory.forProtocol(Protocol)\n"
        with open(path, "w") as f:
            f.write(head + "rules = [Rule(Prefix(b'A'), f, name='a')]\n")
        from muxtwist.config import load_config

        service = MuxService(config_path=path, ports=("tcp:0:interface=127.0.0.1",))
        service.load(load_config(path))
        with open(path, "w") as f:
            f.write(head + "rules = [Rule(Prefix(b'A'), f), Rule(Prefix(b'B'), f)]\n")
        self.assertFalse(service.reload())
        (listener,) = service.listeners.values()
        self.assertEqual([r.name for r in listener.factory.rules], ["a"])
