"""
Edges of a reload that changes listeners, on real loopback sockets: a stop
that begins while a reload closes ports, and endpoints whose addresses
cannot be compared (a plugin's, ``systemd:``).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import defer, endpoints, reactor

from tests.reloading import RulesFileCase
from tests.test_service import Client
from tests.twistd import free_port

RULES = """\
from twisted.internet.protocol import Factory, Protocol
from muxtwist import Rule
from muxtwist.matchers import Prefix


class Hold(Protocol):
    def dataReceived(self, data):
        self.transport.write(b"%s:" % WORD + data)
        if data.endswith(b"BYE"):
            self.transport.loseConnection()


listeners = {{{entries}}}
sniff_timeout = 2
shutdown_timeout = 10
WORD = b"{word}"
"""
HOLD = '"{description}": [Rule(Prefix(b"HI"), Factory.forProtocol(Hold), name="hi")]'


class Held(Client):
    """A client whose connection was handed off: ``answered`` fires with the first answer."""


async def held(port: int) -> Held:
    """A connection to 127.0.0.1:port that says HI, so that the rule's Hold protocol holds it."""
    client = Held()
    await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    client.transport.write(b"HI")  # type: ignore[union-attr]
    return client


class RulesFile(RulesFileCase):
    """A service of a rules file of listeners whose rule answers WORD and holds the connection."""

    TEMPLATE = RULES
    ENTRY = HOLD


def fired(d: defer.Deferred[Any]) -> list[object]:
    """What ``d`` fired with, once it has (its result is left alone): empty until then."""
    results: list[object] = []

    def keep(result: object) -> object:
        results.append(result)
        return result

    d.addBoth(keep)
    return results


class StopDuringReloadTests(RulesFile):
    """A stop while listeners a reload closed still close or drain."""

    @defer.inlineCallbacks
    def test_a_stop_during_a_same_port_reload_waits_for_the_closed_listeners_connections(self) -> Any:
        """A stop begun while a reload closes a port for a new description ends once that port's connections end."""
        port = free_port()
        service = self.start(f"tcp:{port}:interface=127.0.0.1")
        client = yield defer.Deferred.fromCoroutine(held(port))
        self.assertEqual((yield client.answered), b"one:HI")
        self.write((f"tcp:{port}",), "two")
        reloaded = service.reload()
        stopped = service.stopService()
        ended = fired(stopped)
        self.assertFalse((yield reloaded))
        self.assertEqual(ended, [])
        self.assertFalse(client.lost.called)
        client.transport.write(b"BYE")  # type: ignore[union-attr]
        self.assertEqual((yield client.lost), b"one:HIone:BYE")
        yield stopped
        self.assertEqual(ended, [None])
        self.assertEqual(service.connections, [])

    @defer.inlineCallbacks
    def test_a_stop_waits_for_the_connections_of_a_listener_a_reload_removed(self) -> Any:
        """A stop while a listener a reload removed still drains ends once that listener's connections end."""
        old, new = free_port(), free_port()
        service = self.start(f"tcp:{old}:interface=127.0.0.1")
        client = yield defer.Deferred.fromCoroutine(held(old))
        self.assertEqual((yield client.answered), b"one:HI")
        self.write((f"tcp:{new}:interface=127.0.0.1",), "two")
        self.assertTrue((yield service.reload()))
        stopped = service.stopService()
        ended = fired(stopped)
        self.assertEqual(ended, [])
        client.transport.write(b"BYE")  # type: ignore[union-attr]
        self.assertEqual((yield client.lost), b"one:HIone:BYE")
        yield stopped
        self.assertEqual(ended, [None])

    @defer.inlineCallbacks
    def test_a_stop_logs_the_connections_of_listeners_a_reload_removed_it_waits_for(self) -> Any:
        """A stop that waits for a connection of a listener a reload removed says so in the log, with the count."""
        old, new = free_port(), free_port()
        service = self.start(f"tcp:{old}:interface=127.0.0.1")
        client = yield defer.Deferred.fromCoroutine(held(old))
        self.assertEqual((yield client.answered), b"one:HI")
        self.write((f"tcp:{new}:interface=127.0.0.1",), "two")
        self.assertTrue((yield service.reload()))
        events = self.log_events()
        stopped = service.stopService()
        waiting = [e for e in events if "a reload closed" in e.get("log_format", "")]
        self.assertEqual([e.get("n") for e in waiting], [1])
        client.transport.write(b"BYE")  # type: ignore[union-attr]
        yield client.lost
        yield stopped

    @defer.inlineCallbacks
    def test_a_second_stop_signal_does_not_say_the_timeout_was_reached(self) -> Any:
        """stop_now (a second SIGTERM) aborts a held connection, logged as stopping now, not as shutdown_timeout."""
        port = free_port()
        service = self.start(f"tcp:{port}:interface=127.0.0.1")
        client = yield defer.Deferred.fromCoroutine(held(port))
        self.assertEqual((yield client.answered), b"one:HI")
        lines = self.log_lines()
        stopped = service.stopService()
        service.stop_now()
        yield client.lost
        yield stopped
        aborting = [line for line in lines if "aborting" in line]
        self.assertEqual(aborting, ["stopping now: aborting 1 connection(s)"])

    @defer.inlineCallbacks
    def test_listener_lines_keep_the_services_namespace(self) -> Any:
        """A listener's 'listening on' line is in muxtwist.service, as before Listener moved to its own module."""
        events = self.log_events()
        port = free_port()
        self.start(f"tcp:{port}:interface=127.0.0.1")
        yield defer.succeed(None)
        listening = [e for e in events if e.get("log_format", "").startswith("listening on")]
        self.assertEqual([e["log_namespace"] for e in listening], ["muxtwist.service"])


HIDDEN_PLUGIN = """\
from zope.interface import implementer
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.plugin import IPlugin


@implementer(IStreamServerEndpoint)
class Hidden:
    \"\"\"A TCP endpoint on 127.0.0.1 whose address muxtwist cannot read, as a plugin's.\"\"\"

    def __init__(self, inner):
        self.inner = inner

    def listen(self, factory):
        return self.inner.listen(factory)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class Parser:
    prefix = "muxtwisthidden"

    def parseStreamServer(self, reactor, port):
        return Hidden(TCP4ServerEndpoint(reactor, int(port), interface="127.0.0.1"))


parser = Parser()
"""


class IncomparableEndpointTests(RulesFile):
    """Listeners on endpoints whose addresses cannot be compared (a plugin's, ``systemd:``) in a failed reload."""

    def listening(self) -> socket.socket:
        """A socket listening on 127.0.0.1, closed at the end."""
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(5)
        return listening

    def held_port(self) -> int:
        """The port of a socket of another server listening on 127.0.0.1, closed at the end."""
        return int(self.listening().getsockname()[1])

    def hidden_plugin(self) -> None:
        """The ``muxtwisthidden:PORT`` endpoint plugin (HIDDEN_PLUGIN) installed for this test."""
        import twisted.plugins

        folder = os.path.abspath(self.mktemp())
        os.mkdir(folder)
        with open(os.path.join(folder, "muxtwist_test_hidden.py"), "w") as f:
            f.write(HIDDEN_PLUGIN)
        self.patch(twisted.plugins, "__path__", [*twisted.plugins.__path__, folder])

    @defer.inlineCallbacks
    def test_plugin_endpoint_of_a_failed_reload_serves_on_beside_another(self) -> Any:
        """A plugin endpoint A -> another B and a taken port: A serves on with its rules, B listens, reload False."""
        self.hidden_plugin()
        a, b = free_port(), free_port()
        service = self.start(f"muxtwisthidden:{a}")
        taken = self.held_port()
        self.write((f"muxtwisthidden:{b}", f"tcp:{taken}:interface=127.0.0.1"), "two")
        self.assertFalse((yield service.reload()))
        self.assertEqual(sorted(service.listeners), sorted([f"muxtwisthidden:{a}", f"muxtwisthidden:{b}"]))
        for port, answer in [(a, b"one:HI"), (b, b"two:HI")]:
            client = yield defer.Deferred.fromCoroutine(held(port))
            self.assertEqual((yield client.answered), answer)
            client.transport.loseConnection()  # type: ignore[union-attr]
            yield client.lost

    @defer.inlineCallbacks
    def test_plugin_endpoint_moved_to_a_new_one_on_its_address_is_said_served_not_closed(self) -> Any:
        """A plugin endpoint A -> B on A's address and a taken port: the line says B serves A's address, not closed."""
        self.hidden_plugin()
        a = free_port()
        service = self.start(f"muxtwisthidden:{a}")
        taken = self.held_port()
        # The same address written another way: a new description, whose address muxtwist cannot compare with A's.
        moved = f"muxtwisthidden:0{a}"
        lines = self.log_lines()
        self.write((moved, f"tcp:{taken}:interface=127.0.0.1"), "two")
        self.assertFalse((yield service.reload()))
        self.assertEqual(sorted(service.listeners), [moved])
        client = yield defer.Deferred.fromCoroutine(held(a))
        self.assertEqual((yield client.answered), b"two:HI")
        client.transport.loseConnection()  # type: ignore[union-attr]
        yield client.lost
        about = [line for line in lines if f"muxtwisthidden:{a}" in line and "reload" in line]
        self.assertFalse([line for line in about if "stays closed" in line], about)
        served = [line for line in about if f"{moved} listens on its address" in line]
        self.assertEqual(len(served), 1, about)
        self.assertIn(f"127.0.0.1:{a}", served[0])

    @defer.inlineCallbacks
    def test_systemd_socket_of_a_failed_reload_serves_on_beside_another(self) -> Any:
        """systemd: index 0 -> index 1 and a taken port: socket 0 serves on with its rules, 1 listens, reload False."""
        from twisted.python.systemd import ListenFDs

        sockets = [self.listening(), self.listening()]
        # What systemd passes: listening sockets by index (Twisted closes each one it adopts, so copies).
        descriptors = [os.dup(each.fileno()) for each in sockets]
        self.patch(endpoints._SystemdParser, "_sddaemon", ListenFDs(descriptors))
        service = self.start("systemd:domain=INET:index=0")
        taken = self.held_port()
        self.write(("systemd:domain=INET:index=1", f"tcp:{taken}:interface=127.0.0.1"), "two")
        self.assertFalse((yield service.reload()))
        self.assertEqual(sorted(service.listeners), ["systemd:domain=INET:index=0", "systemd:domain=INET:index=1"])
        for each, answer in zip(sockets, [b"one:HI", b"two:HI"], strict=True):
            client = yield defer.Deferred.fromCoroutine(held(each.getsockname()[1]))
            self.assertEqual((yield client.answered), answer)
            client.transport.loseConnection()  # type: ignore[union-attr]
            yield client.lost

    @defer.inlineCallbacks
    def test_systemd_socket_named_another_way_keeps_listening(self) -> Any:
        """systemd: index 0 written another way (the same socket): it serves on with the new rules, reload True."""
        from twisted.python.systemd import ListenFDs

        listening = self.listening()
        # What systemd passes; Twisted closes it once adopted, so it can never be adopted again.
        self.patch(endpoints._SystemdParser, "_sddaemon", ListenFDs([os.dup(listening.fileno())]))
        service = self.start("systemd:domain=INET:index=0")
        self.write(("systemd:index=0:domain=INET",), "two")
        self.assertTrue((yield service.reload()))
        self.assertEqual(sorted(service.listeners), ["systemd:index=0:domain=INET"])
        client = yield defer.Deferred.fromCoroutine(held(listening.getsockname()[1]))
        self.assertEqual((yield client.answered), b"two:HI")
        client.transport.loseConnection()  # type: ignore[union-attr]
        yield client.lost

    @defer.inlineCallbacks
    def test_a_systemd_socket_a_reload_closed_is_never_adopted_again(self) -> Any:
        """systemd: index 0 -> 1 -> 0: the move back is refused, one line; the file now at 0's number is left alone."""
        from twisted.python.systemd import ListenFDs

        sockets = [self.listening(), self.listening()]
        # High numbers, which no file this process opens meanwhile takes.
        descriptors = [os.dup2(each.fileno(), 900 + n) for n, each in enumerate(sockets)]
        self.patch(endpoints._SystemdParser, "_sddaemon", ListenFDs(descriptors))
        service = self.start("systemd:domain=INET:index=0")
        self.write(("systemd:domain=INET:index=1",), "two")
        self.assertTrue((yield service.reload()))
        # Twisted closed socket 0's descriptor when it adopted it; another file now has its number.
        victim = socket.socket()
        self.addCleanup(victim.close)
        victim.bind(("127.0.0.1", 0))
        victim.listen(5)
        victim.setblocking(False)
        os.dup2(victim.fileno(), descriptors[0])
        self.addCleanup(os.close, descriptors[0])
        lines = self.log_lines()
        self.write(("systemd:domain=INET:index=0", "systemd:domain=INET:index=1"), "three")
        self.assertFalse((yield service.reload()))
        self.assertEqual(sorted(service.listeners), ["systemd:domain=INET:index=1"])
        os.fstat(descriptors[0])  # still open: nothing adopted and closed it
        refused = [line for line in lines if "cannot listen on systemd:domain=INET:index=0" in line]
        self.assertEqual(len(refused), 1, lines)
        self.assertIn("restart", refused[0])
        client = yield defer.Deferred.fromCoroutine(held(sockets[1].getsockname()[1]))
        self.assertEqual((yield client.answered), b"three:HI")
        client.transport.loseConnection()  # type: ignore[union-attr]
        yield client.lost
