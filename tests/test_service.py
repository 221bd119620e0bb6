"""
Tests for muxtwist.service.MuxService on real loopback sockets: listeners,
the graceful stop and reloading the rules file.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, endpoints, error, protocol, reactor, task
from twisted.trial import unittest

from muxtwist import MuxService, Rule, SniffingFactory
from muxtwist.matchers import Prefix
from tests.reloading import RulesFileCase

#: How long a test waits for an event on loopback before failing (a slow, busy machine).
WAIT = 30.0


class Dribbler(protocol.Protocol):
    """On 'SLOW n', writes n numbered chunks 50 ms apart, then closes; on 'STUCK', never answers."""

    factory: DribblerFactory

    def dataReceived(self, data: bytes) -> None:
        if not self.factory.handed_off.called:
            self.factory.handed_off.callback(None)
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


class DribblerFactory(protocol.Factory):
    """Dribblers; ``handed_off`` fires when the first of them gets its bytes (sniffing is over)."""

    protocol = Dribbler

    def __init__(self) -> None:
        self.handed_off: defer.Deferred[None] = defer.Deferred()


class Client(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: defer.Deferred[bytes] = defer.Deferred()
        #: fires at the first bytes received, with them
        self.answered: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.answered.called:
            self.answered.callback(self.received)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(self.received)


async def connect(port: int, send: bytes) -> Client:
    client = Client()
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await endpoints.connectProtocol(endpoint, client)
    if send:
        client.transport.write(send)  # type: ignore[union-attr]
    return client


async def connect_unix(path: str, send: bytes) -> Client:
    client = Client()
    await endpoints.connectProtocol(endpoints.UNIXClientEndpoint(reactor, path), client)
    client.transport.write(send)  # type: ignore[union-attr]
    return client


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait, without blocking the reactor, until ``condition()`` holds; fail after WAIT seconds."""
    deadline = reactor.seconds() + WAIT  # type: ignore[attr-defined]
    while not condition():
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            raise AssertionError(f"not seen within {WAIT} s: {what}")
        await task.deferLater(reactor, 0.01, lambda: None)


def port_of(service: MuxService) -> int:
    (listener,) = service.listeners.values()
    port: int = listener._waitingForPort.result.getHost().port  # type: ignore[union-attr]
    return port


class StopTests(unittest.TestCase):
    def make_service(self, shutdown_timeout: float) -> MuxService:
        service = MuxService(shutdown_timeout=shutdown_timeout)
        self.dribblers = DribblerFactory()
        factory = SniffingFactory([Rule(Prefix(b"SLOW", b"STUCK"), self.dribblers)])
        service.add_listener("tcp:0:interface=127.0.0.1", factory)
        service.startService()
        return service

    @defer.inlineCallbacks
    def test_transfer_in_flight_completes(self) -> Any:
        """A handed-off transfer still running at stop finishes intact before stopService fires."""
        service = self.make_service(shutdown_timeout=10)
        client = yield defer.Deferred.fromCoroutine(connect(port_of(service), b"SLOW 6"))
        # Stop once the first chunk is here: the other five are 5 x 50 ms of reactor time away.
        yield client.answered.addTimeout(WAIT, reactor)
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
        yield self.dribblers.handed_off.addTimeout(WAIT, reactor)
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
        yield defer.Deferred.fromCoroutine(until(lambda: len(service.connections) == 1, "the connection accepted"))
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
        self.assertTrue((yield service.reload()))
        fresh = yield defer.Deferred.fromCoroutine(connect(port, b"HI"))
        self.assertEqual((yield fresh.lost), b"new")
        sniffing.transport.write(b"I")  # type: ignore[union-attr]
        self.assertEqual((yield sniffing.lost), b"old")
        self.write(path, "rules = [\n")
        self.assertFalse((yield service.reload()))
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
        self.assertFalse(self.successResultOf(service.reload()))
        (listener,) = service.listeners.values()
        self.assertEqual([r.name for r in listener.factory.rules], ["a"])


LISTENERS = """\
from twisted.internet.protocol import Factory, Protocol
from muxtwist import Rule
from muxtwist.matchers import Prefix


class Say(Protocol):
    def dataReceived(self, data):
        self.transport.write(b"%s:" % WORD + data)
        self.transport.loseConnection()


listeners = {{{entries}}}
sniff_timeout = 2
WORD = b"{word}"
"""
LISTENER = '"{description}": [Rule(Prefix(b"HI"), Factory.forProtocol(Say), name="hi")]'


class ReloadListenerTests(RulesFileCase):
    """Reloads that change listeners, on real ports."""

    TEMPLATE = LISTENERS
    ENTRY = LISTENER
    SHUTDOWN_TIMEOUT = 1

    def held_port(self, host: str, port: int) -> Any:
        """A socket of another server listening on ``host:port`` (0: any free one), closed at the end."""
        import socket

        blocker = socket.socket()
        self.addCleanup(blocker.close)
        blocker.bind((host, port))
        blocker.listen(1)
        return blocker

    @defer.inlineCallbacks
    def test_reload_that_keeps_the_port_keeps_serving(self) -> Any:
        """A reload that adds interface= to a listener on the same port closes the old port first and serves on."""
        from tests.twistd import free_port

        port = free_port()
        service = self.start(f"tcp:{port}")
        first = yield defer.Deferred.fromCoroutine(connect(port, b"HI"))
        self.assertEqual((yield first.lost), b"one:HI")
        self.write(f"tcp:{port}:interface=127.0.0.1", "two")
        self.assertTrue((yield service.reload()))
        self.assertEqual(list(service.listeners), [f"tcp:{port}:interface=127.0.0.1"])
        second = yield defer.Deferred.fromCoroutine(connect(port, b"HI"))
        self.assertEqual((yield second.lost), b"two:HI")

    @defer.inlineCallbacks
    def test_unix_listener_of_a_failed_reload_serves_on_beside_another_unix_one(self) -> Any:
        """unix:a -> unix:missing/b (cannot listen) and unix:c: a serves on with its rules, c listens, reload False."""
        import tempfile

        folder = tempfile.mkdtemp(prefix="muxtwist-test-")
        self.addCleanup(shutil.rmtree, folder, True)
        a, b, c = (os.path.join(folder, name) for name in ("a.sock", "missing/b.sock", "c.sock"))
        service = self.start(f"unix:{a}")
        self.write((f"unix:{b}", f"unix:{c}"), "two")
        self.assertFalse((yield service.reload()))
        old = yield defer.Deferred.fromCoroutine(connect_unix(a, b"HI"))
        self.assertEqual((yield old.lost), b"one:HI")
        new = yield defer.Deferred.fromCoroutine(connect_unix(c, b"HI"))
        self.assertEqual((yield new.lost), b"two:HI")

    @defer.inlineCallbacks
    def test_unix_path_written_through_a_symlink_is_the_same_listener_moved(self) -> Any:
        """unix:D/real/x.sock -> unix:D/link/x.sock, link -> real: the old closes first, the new one listens."""
        import tempfile

        folder = tempfile.mkdtemp(prefix="muxtwist-test-")
        self.addCleanup(shutil.rmtree, folder, True)
        os.mkdir(os.path.join(folder, "real"))
        os.symlink("real", os.path.join(folder, "link"))
        service = self.start(f"unix:{os.path.join(folder, 'real', 'x.sock')}")
        self.write(f"unix:{os.path.join(folder, 'link', 'x.sock')}", "two")
        self.assertTrue((yield service.reload()))
        client = yield defer.Deferred.fromCoroutine(connect_unix(os.path.join(folder, "real", "x.sock"), b"HI"))
        self.assertEqual((yield client.lost), b"two:HI")

    @defer.inlineCallbacks
    def test_listener_that_cannot_listen_fails_the_reload_and_is_retried(self) -> Any:
        """A new listener whose port is taken makes reload report failure and log why; the next reload retries it."""

        events = self.log_events()
        service = self.start("tcp:0:interface=127.0.0.1")
        blocker = self.held_port("127.0.0.1", 0)
        port = blocker.getsockname()[1]
        self.write(f"tcp:{port}:interface=127.0.0.1", "two")
        self.assertFalse((yield service.reload()))
        problems = [e for e in events if "cannot listen on" in e.get("log_format", "")]
        self.assertEqual(len(problems), 1)
        self.assertIn("Address already in use", problems[0]["problem"])
        self.assertEqual(list(service.listeners), ["tcp:0:interface=127.0.0.1"])
        blocker.close()
        self.assertTrue((yield service.reload()))
        self.assertEqual(list(service.listeners), [f"tcp:{port}:interface=127.0.0.1"])
        client = yield defer.Deferred.fromCoroutine(connect(port, b"HI"))
        self.assertEqual((yield client.lost), b"two:HI")

    @defer.inlineCallbacks
    def test_listener_moved_to_a_taken_port_keeps_serving_on_its_old_port(self) -> Any:
        """A listener moved to a taken port serves on at its old port with its old rules; reload says False, logged."""

        from tests.twistd import free_port

        events = self.log_events()
        old = free_port()
        service = self.start(f"tcp:{old}:interface=127.0.0.1")
        waiting = yield defer.Deferred.fromCoroutine(connect(old, b""))
        blocker = self.held_port("127.0.0.1", 0)
        taken = blocker.getsockname()[1]
        self.write(f"tcp:{taken}:interface=127.0.0.1", "two")
        self.assertFalse((yield service.reload()))
        problems = [e for e in events if "cannot listen on" in e.get("log_format", "")]
        self.assertEqual([e["description"] for e in problems], [f"tcp:{taken}:interface=127.0.0.1"])
        self.assertIn("Address already in use", problems[0]["problem"])
        self.assertEqual(list(service.listeners), [f"tcp:{old}:interface=127.0.0.1"])
        client = yield defer.Deferred.fromCoroutine(connect(old, b"HI"))
        self.assertEqual((yield client.lost), b"one:HI")
        waiting.transport.write(b"HI")  # type: ignore[union-attr]
        self.assertEqual((yield waiting.lost), b"one:HI")

    @defer.inlineCallbacks
    def test_same_port_listener_that_cannot_listen_gives_the_port_back_to_the_old_one(self) -> Any:
        """A same-port listener that cannot listen gets the old one listening again, logged, its connections kept."""

        from tests.twistd import free_port

        events = self.log_events()
        port = free_port()
        service = self.start(f"tcp:{port}:interface=127.0.0.1")
        waiting = yield defer.Deferred.fromCoroutine(connect(port, b""))
        # Another process holds the port on another loopback address: all interfaces cannot listen.
        blocker = self.held_port("127.0.0.2", port)
        self.write(f"tcp:{port}", "two")
        self.assertFalse((yield service.reload()))
        problems = [e for e in events if "cannot listen on" in e.get("log_format", "")]
        self.assertEqual([e["description"] for e in problems], [f"tcp:{port}"])
        again = [e for e in events if e.get("log_format", "").startswith("reload: listening again on")]
        self.assertEqual([e["description"] for e in again], [f"tcp:{port}:interface=127.0.0.1"])
        self.assertEqual(list(service.listeners), [f"tcp:{port}:interface=127.0.0.1"])
        client = yield defer.Deferred.fromCoroutine(connect(port, b"HI"))
        self.assertEqual((yield client.lost), b"one:HI")
        waiting.transport.write(b"HI")  # type: ignore[union-attr]
        self.assertEqual((yield waiting.lost), b"one:HI")
        blocker.close()
        self.assertTrue((yield service.reload()))
        self.assertEqual(list(service.listeners), [f"tcp:{port}"])
        client = yield defer.Deferred.fromCoroutine(connect(port, b"HI"))
        self.assertEqual((yield client.lost), b"two:HI")

    @defer.inlineCallbacks
    def test_removed_listeners_serve_on_until_every_added_listener_listens(self) -> Any:
        """Listeners a reload removes serve on with their running rules until every listener it adds listens."""
        from tests.twistd import free_port

        first, second, third = free_port(), free_port(), free_port()
        old = (f"tcp:{first}:interface=127.0.0.1", f"tcp:{second}:interface=127.0.0.1")
        service = self.start(*old)
        blocker = self.held_port("127.0.0.1", 0)
        taken = blocker.getsockname()[1]
        new = (f"tcp:{third}:interface=127.0.0.1", f"tcp:{taken}:interface=127.0.0.1")
        self.write(new, "two")
        self.assertFalse((yield service.reload()))
        self.assertEqual(sorted(service.listeners), sorted([*old, new[0]]))
        for port, answer in [(first, b"one:HI"), (second, b"one:HI"), (third, b"two:HI")]:
            client = yield defer.Deferred.fromCoroutine(connect(port, b"HI"))
            self.assertEqual((yield client.lost), answer)
        blocker.close()
        self.assertTrue((yield service.reload()))
        self.assertEqual(sorted(service.listeners), sorted(new))
        client = yield defer.Deferred.fromCoroutine(connect(taken, b"HI"))
        self.assertEqual((yield client.lost), b"two:HI")
        yield self.assertFailure(defer.Deferred.fromCoroutine(connect(first, b"HI")), error.ConnectionRefusedError)

    @defer.inlineCallbacks
    def test_back_to_back_reloads_that_move_a_port_end_serving_the_last_file(self) -> Any:
        """Reloads asked before the previous one closed its old port end with the last file's listener serving."""
        from tests.twistd import free_port

        port = free_port()
        service = self.start(f"tcp:{port}")
        pending = []
        for i in range(6):
            description = f"tcp:{port}:interface=127.0.0.1" if i % 2 == 0 else f"tcp:{port}"
            self.write(description, f"w{i}")
            pending.append(service.reload())
        results = yield defer.gatherResults(pending)
        self.assertEqual(results, [True] * 6)
        self.assertEqual(list(service.listeners), [f"tcp:{port}"])
        self.assertTrue(all(listener.running for listener in service.listeners.values()))
        client = yield defer.Deferred.fromCoroutine(connect(port, b"HI"))
        self.assertEqual((yield client.lost), b"w5:HI")


#: What the applications of AppStartupTests' rules files did: ("start" | "stop", version).
APP_EVENTS: list[tuple[str, str]] = []

APP_RULES = """
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from muxtwist import Rule
from muxtwist.matchers import Prefix
from tests.test_service import APP_EVENTS

class App(Factory):
    protocol = Protocol
    def startFactory(self):
        APP_EVENTS.append(("start", VERSION))
    def stopFactory(self):
        APP_EVENTS.append(("stop", VERSION))
    def when_started(self):
        return defer.Deferred() if SLOW else defer.succeed(True)

rules = [Rule(Prefix(b"A"), App(), name="app")]
shutdown_timeout = 5
"""


class AppStartupTests(unittest.TestCase):
    """A reload waits for the startup of the new rules' applications, for at most shutdown_timeout."""

    def test_an_app_startup_slower_than_shutdown_timeout_refuses_the_reload(self) -> None:
        """The new app is started, given up after shutdown_timeout and stopped; the running rules stay."""
        from muxtwist.config import load_config

        del APP_EVENTS[:]
        clock = task.Clock()
        path = os.path.abspath(self.mktemp() + "-rules.py")
        with open(path, "w") as f:
            f.write(APP_RULES + "VERSION, SLOW = 'one', False\n")
        service = MuxService(config_path=path, ports=("tcp:0:interface=127.0.0.1",), reactor=clock)
        service.load(load_config(path))
        (listener,) = service.listeners.values()
        first = listener.factory.rules[0].factory
        self.assertEqual(APP_EVENTS, [("start", "one")])
        del APP_EVENTS[:]
        with open(path, "w") as f:
            f.write(APP_RULES + "VERSION, SLOW = 'two', True\n")
        done = service.reload()
        self.assertNoResult(done)
        self.assertEqual(APP_EVENTS, [("start", "two")])
        clock.advance(5.1)
        self.assertFalse(self.successResultOf(done))
        self.assertEqual(APP_EVENTS, [("start", "two"), ("stop", "two")])
        self.assertIs(listener.factory.rules[0].factory, first)
        with open(path, "w") as f:
            f.write(APP_RULES + "VERSION, SLOW = 'three', False\n")
        self.assertTrue(self.successResultOf(service.reload()))
        self.assertIsNot(listener.factory.rules[0].factory, first)
        # Started once for its rules, however many times reload and the listener asked.
        self.assertEqual(APP_EVENTS[2:], [("start", "three"), ("stop", "one")])


#: The startups of ReloadQueueTests' applications, by version, for the test to finish.
APP_STARTUPS: dict[str, defer.Deferred[bool]] = {}

WAITING_APP_RULES = """
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from muxtwist import Rule
from muxtwist.matchers import Prefix
from tests.test_service import APP_EVENTS, APP_STARTUPS

class App(Factory):
    protocol = Protocol
    def startFactory(self):
        APP_EVENTS.append(("start", VERSION))
        APP_STARTUPS[VERSION] = defer.Deferred()
    def stopFactory(self):
        APP_EVENTS.append(("stop", VERSION))
    def when_started(self):
        d = defer.Deferred()
        APP_STARTUPS[VERSION].chainDeferred(d)
        return d

rules = [Rule(Prefix(b"A"), App(), name="app")]
shutdown_timeout = 5
"""


class ReloadQueueTests(unittest.TestCase):
    """Reloads asked while one waits for an application's startup, and a stop meanwhile."""

    def setUp(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from muxtwist.config import load_config

        del APP_EVENTS[:]
        APP_STARTUPS.clear()
        self.reactor = MemoryReactorClock()
        self.path = os.path.abspath(self.mktemp() + "-rules.py")
        self.write("one")
        self.service = MuxService(config_path=self.path, ports=("tcp:0:interface=127.0.0.1",), reactor=self.reactor)
        self.service.load(load_config(self.path))
        APP_STARTUPS["one"].callback(True)
        self.service.startService()
        del APP_EVENTS[:]

    def write(self, version: str) -> None:
        with open(self.path, "w") as f:
            f.write(WAITING_APP_RULES + f"VERSION = {version!r}\n")

    def test_reloads_asked_during_an_app_startup_are_one_more_reload(self) -> None:
        """Many reloads asked while one waits for its app's startup run as one more reload, which starts one app."""
        self.write("two")
        first = self.service.reload()
        self.write("three")
        later = [self.service.reload() for _ in range(5)]
        APP_STARTUPS["two"].callback(True)
        self.assertTrue(self.successResultOf(first))
        APP_STARTUPS["three"].callback(True)
        self.assertEqual([self.successResultOf(d) for d in later], [True] * 5)
        self.assertEqual(
            APP_EVENTS, [("start", "two"), ("stop", "one"), ("start", "three"), ("stop", "two")], APP_EVENTS
        )

    def test_a_stop_during_a_reload_applies_and_starts_nothing_more(self) -> None:
        """A stop while a reload waits for its app's startup: that reload is not applied and a queued one never runs."""
        (listener,) = self.service.listeners.values()
        running = listener.factory.rules[0].factory
        self.write("two")
        first = self.service.reload()
        self.write("three")
        queued = self.service.reload()
        self.service.stopService()
        APP_STARTUPS["two"].callback(True)
        self.assertFalse(self.successResultOf(first))
        self.assertFalse(self.successResultOf(queued))
        self.assertIs(listener.factory.rules[0].factory, running)
        self.assertCountEqual(APP_EVENTS, [("start", "two"), ("stop", "two"), ("stop", "one")])
