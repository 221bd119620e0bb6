"""
AsyncioProtocol: asyncio protocols served on sniffed connections, over real
loopback sockets. The protocols here do not touch the event loop, so these
run under any reactor; the stream-protocol tests that need the loop are in
tests/test_aio.py.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

from twisted.internet import defer, threads
from twisted.trial import unittest

from muxtwist import Rule
from muxtwist._twisted import unsent_bytes
from muxtwist.apps import AsyncioProtocol
from muxtwist.matchers import Prefix
from tests.test_proxy_support import R, connect, mux, until, wait
from tests.test_proxy_tls import NAME, fetch_over_tls, terminating_mux


class Echo(asyncio.Protocol):
    """Echoes everything; records what its transport says about the connection."""

    made: list[Echo] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        self.local = transport.get_extra_info("sockname")
        self.lost: list[Exception | None] = []
        Echo.made.append(self)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


class Counter(asyncio.Protocol):
    """Counts bytes; on the client's half-close answers the count and half-closes too."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.n = 0

    def data_received(self, data: bytes) -> None:
        self.n += len(data)

    def eof_received(self) -> bool:
        self.transport.writelines([b"count=", str(self.n).encode()])
        assert self.transport.can_write_eof()
        self.transport.write_eof()
        return True


class Firehose(asyncio.Protocol):
    """Writes ``total`` bytes as fast as flow control lets it, stopping while paused."""

    chunk = b"x" * 65536

    def __init__(self, total: int) -> None:
        self.total = total
        self.written = 0
        self.paused = False
        self.pauses = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.pump()

    def pump(self) -> None:
        while not self.paused and self.written < self.total:
            n = min(len(self.chunk), self.total - self.written)
            self.transport.write(self.chunk[:n])
            self.written += n
        if self.written >= self.total and not self.transport.is_closing():
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_writing(self) -> None:
        self.paused = False
        R.callLater(0, self.pump)


class AsyncioProtocolTests(unittest.TestCase):
    def setUp(self) -> None:
        Echo.made = []

    async def test_sniffed_bytes_reach_data_received_first(self) -> None:
        """The bytes the sniffer read are replayed to data_received before anything later, in order."""
        port, _ = mux(self, [Rule(Prefix(b"ECHO"), AsyncioProtocol(Echo))])
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(b"ECHO one ")
        await client.received_at_least(9)
        client.transport.write(b"two")
        self.assertEqual(await client.received_at_least(12), b"ECHO one two")

    async def test_extra_info_names_both_ends(self) -> None:
        """get_extra_info gives the client's and our (host, port) as asyncio transports do."""
        port, _ = mux(self, [Rule(Prefix(b"ECHO"), AsyncioProtocol(Echo))])
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(b"ECHO")
        await client.received_at_least(4)
        (proto,) = Echo.made
        mine = client.transport.getHost()
        self.assertEqual(proto.peer, (mine.host, mine.port))
        self.assertEqual(proto.local, ("127.0.0.1", port))
        self.assertIsNone(proto.transport.get_extra_info("ssl_object"))
        self.assertEqual(proto.transport.get_extra_info("nothing", 7), 7)

    async def test_answers_leave_at_once_without_nagle(self) -> None:
        """As on asyncio's TCP transports: TCP_NODELAY is set, and a write reaches the socket before write() returns."""
        port, _ = mux(self, [Rule(Prefix(b"ECHO"), AsyncioProtocol(Echo))])
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(b"ECHO")
        await client.received_at_least(4)
        (proto,) = Echo.made
        twisted_transport = proto.transport.get_extra_info("twisted_transport")
        handle = twisted_transport.getHandle()
        self.assertEqual(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
        proto.transport.write(b"now")
        self.assertEqual(unsent_bytes(twisted_transport), 0)
        self.assertEqual(await client.received_at_least(7), b"ECHOnow")

    async def test_close_reaches_connection_lost(self) -> None:
        """The protocol's close ends the connection and connection_lost is called with None."""

        class CloseOnData(Echo):
            def data_received(self, data: bytes) -> None:
                self.transport.write(b"bye")
                self.transport.close()
                self.transport.write(b"ignored after close")

        port, _ = mux(self, [Rule(Prefix(b"ECHO"), AsyncioProtocol(CloseOnData))])
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(b"ECHO")
        await client.closed()
        self.assertEqual(bytes(client.received), b"bye")
        await until(lambda: bool(Echo.made[0].lost))
        self.assertEqual(Echo.made[0].lost, [None])

    async def test_client_reset_reaches_connection_lost_with_an_error(self) -> None:
        """A client that aborts makes connection_lost get an exception, as asyncio does."""
        port, _ = mux(self, [Rule(Prefix(b"ECHO"), AsyncioProtocol(Echo))])
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(b"ECHO")
        await client.received_at_least(4)
        client.transport.abortConnection()  # type: ignore[attr-defined]
        await until(lambda: bool(Echo.made[0].lost))
        self.assertIsInstance(Echo.made[0].lost[0], Exception)

    async def test_half_close_calls_eof_received_and_write_eof_half_closes(self) -> None:
        """The client's FIN calls eof_received; returning True keeps writing open until write_eof."""
        port, _ = mux(self, [Rule(Prefix(b"COUNT"), AsyncioProtocol(Counter))])
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(b"COUNT 1234567890")
        client.transport.loseWriteConnection()  # type: ignore[attr-defined]
        reason = await client.closed()
        self.assertEqual(bytes(client.received), b"count=16")
        self.assertIn("ConnectionDone", repr(reason))

    async def test_half_close_during_sniffing_reaches_eof_received_after_replay(self) -> None:
        """A FIN that arrives while still sniffing reaches eof_received after the replayed bytes."""
        port, _ = mux(self, [Rule(Prefix(b"COUNT-LONGER-PREFIX"), AsyncioProtocol(Counter))])
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(b"COUNT-LONGER-PREFIX")
        client.transport.loseWriteConnection()  # type: ignore[attr-defined]
        await client.closed()
        self.assertEqual(bytes(client.received), b"count=19")

    async def test_eof_received_false_closes_the_connection(self) -> None:
        """An eof_received that returns a false value closes the connection, as asyncio does."""
        port, _ = mux(self, [Rule(Prefix(b"ECHO"), AsyncioProtocol(Echo))])
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(b"ECHO")
        client.transport.loseWriteConnection()  # type: ignore[attr-defined]
        await client.closed()
        self.assertEqual(bytes(client.received), b"ECHO")

    async def test_pause_reading_holds_data_until_resume_reading(self) -> None:
        """After pause_reading no data_received comes until resume_reading, and nothing is lost."""
        protos: list[Any] = []

        class Slow(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, asyncio.Transport)
                self.transport = transport
                self.data = bytearray()
                protos.append(self)

            def data_received(self, data: bytes) -> None:
                self.data += data
                self.transport.pause_reading()

        port, _ = mux(self, [Rule(Prefix(b"SLOW"), AsyncioProtocol(Slow))])
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(b"SLOW")
        await until(lambda: bool(protos) and len(protos[0].data) == 4)
        proto = protos[0]
        self.assertFalse(proto.transport.is_reading())
        client.transport.write(b"more")
        await defer.Deferred.fromCoroutine(_turns(5))
        self.assertEqual(bytes(proto.data), b"SLOW")
        proto.transport.resume_reading()
        await until(lambda: bytes(proto.data) == b"SLOWmore")

    async def test_set_protocol_hands_later_data_to_the_new_protocol(self) -> None:
        """After set_protocol (uvicorn's WebSocket upgrade) data goes to the new protocol."""
        seconds: list[bytes] = []

        class Second(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                seconds.append(data)

        class First(Echo):
            def data_received(self, data: bytes) -> None:
                self.transport.write(b"switching")
                new = Second()
                self.transport.set_protocol(new)
                assert self.transport.get_protocol() is new

        port, _ = mux(self, [Rule(Prefix(b"UP"), AsyncioProtocol(First))])
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(b"UP")
        await client.received_at_least(9)
        client.transport.write(b"after")
        await until(lambda: b"".join(seconds) == b"after")

    async def test_buffered_protocol_gets_every_byte(self) -> None:
        """An asyncio.BufferedProtocol receives every byte through get_buffer/buffer_updated."""
        got = bytearray()

        class Buffered(asyncio.BufferedProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.buffer = bytearray(7)

            def get_buffer(self, sizehint: int) -> bytearray:
                return self.buffer

            def buffer_updated(self, nbytes: int) -> None:
                got.extend(self.buffer[:nbytes])

        port, _ = mux(self, [Rule(Prefix(b"BUF"), AsyncioProtocol(Buffered))])
        client = await connect(self, port)
        assert client.transport is not None
        payload = b"BUF" + bytes(range(256)) * 40
        client.transport.write(payload)
        await until(lambda: len(got) >= len(payload))
        self.assertEqual(bytes(got), payload)

    async def test_slow_reader_pauses_writing_and_bounds_what_is_outstanding(self) -> None:
        """100 MB to a client that reads in bursts: pause_writing keeps what is sent but unread bounded."""
        total = 100 * 1024 * 1024
        built: list[Firehose] = []

        def make() -> Firehose:
            built.append(Firehose(total))
            return built[-1]

        port, _ = mux(self, [Rule(Prefix(b"GO"), AsyncioProtocol(make))])
        client = await connect(self, port)
        assert client.transport is not None
        worst = [0]

        class Reader:
            def __init__(self) -> None:
                self.n = 0

        reader = Reader()

        def data(peer: Any) -> None:
            reader.n += len(peer.received)
            worst[0] = max(worst[0], built[0].written - reader.n)
            peer.received.clear()

        client.on_data = data
        client.transport.write(b"GO")
        # Slow reader: stop reading for a moment every few MB.
        transport: Any = client.transport
        deadline = R.seconds() + 60
        while reader.n < total and not client.lost.called:
            self.assertLess(R.seconds(), deadline, "transfer took over 60 s")
            transport.pauseProducing()
            await _sleep(0.02)
            transport.resumeProducing()
            await _sleep(0.02)
        self.assertEqual(reader.n, total)
        self.assertGreater(built[0].pauses, 0)
        # Loopback socket buffers plus Twisted's 64 KiB write buffer; without
        # flow control the whole 100 MB would be written at once.
        self.assertLess(worst[0], 16 * 1024 * 1024)

    async def test_close_while_writing_is_paused_ends_the_connection_once_flushed(self) -> None:
        """close() called while pause_writing is in effect flushes what was written, then closes the connection."""
        size = 4 * 1024 * 1024
        paused: list[bool] = []

        class BigThenClose(Echo):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                # A small socket buffer: the 4 MiB cannot all go to the
                # socket inside write(), whatever the kernel's autotuning.
                handle = transport.get_extra_info("twisted_transport").getHandle()
                handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)

            def data_received(self, data: bytes) -> None:
                self.transport.write(b"b" * size)
                self.transport.close()

            def pause_writing(self) -> None:
                paused.append(True)

        port, _ = mux(self, [Rule(Prefix(b"BIG"), AsyncioProtocol(BigThenClose))])
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(b"BIG")
        reason = await client.closed()
        self.assertEqual(len(client.received), size)
        self.assertEqual(paused, [True])
        self.assertIn("ConnectionDone", repr(reason))
        await until(lambda: Echo.made[0].lost == [None])

    async def test_write_eof_while_writing_is_paused_half_closes_once_flushed(self) -> None:
        """write_eof() called while pause_writing is in effect sends the FIN after the data, and reading goes on."""
        size = 4 * 1024 * 1024

        class BigThenEof(Echo):
            def data_received(self, data: bytes) -> None:
                if data.startswith(b"BIG"):
                    self.transport.write(b"b" * size)
                    self.transport.write_eof()
                else:
                    self.after = data
                    self.transport.close()

        port, _ = mux(self, [Rule(Prefix(b"BIG"), AsyncioProtocol(BigThenEof))])
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(b"BIG")
        await wait(client.eof, 10)
        self.assertEqual(len(client.received), size)
        client.transport.write(b"still reading")
        await client.closed()
        await until(lambda: bool(Echo.made[0].lost))
        self.assertEqual(Echo.made[0].after, b"still reading")  # type: ignore[attr-defined]

    async def test_abort_reaches_connection_lost_with_none(self) -> None:
        """The protocol's own abort() ends the connection at once and connection_lost gets None, as in asyncio."""

        class WriteThenAbort(Echo):
            def data_received(self, data: bytes) -> None:
                self.transport.write(b"a" * (4 * 1024 * 1024))
                self.transport.abort()
                self.transport.write(b"ignored after abort")

        port, _ = mux(self, [Rule(Prefix(b"ABORT"), AsyncioProtocol(WriteThenAbort))])
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(b"ABORT")
        await client.closed()
        await until(lambda: bool(Echo.made[0].lost))
        self.assertEqual(Echo.made[0].lost, [None])

    async def test_an_ended_connection_is_freed_without_the_cycle_collector(self) -> None:
        """Once connection_lost has run, the protocol and what it wrote are freed by reference counting alone."""
        import gc
        import weakref

        lost: list[object] = []

        class WriteThenAbort(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, asyncio.Transport)
                self.transport = transport

            def data_received(self, data: bytes) -> None:
                self.transport.write(b"a" * (4 * 1024 * 1024))
                self.transport.abort()

            def connection_lost(self, exc: Exception | None) -> None:
                lost.append(weakref.ref(self))

        gc.disable()
        self.addCleanup(gc.enable)
        port, _ = mux(self, [Rule(Prefix(b"ABORT"), AsyncioProtocol(WriteThenAbort))])
        client = await connect(self, port)
        assert client.transport is not None
        client.transport.write(b"ABORT")
        await client.closed()
        await until(lambda: bool(lost))
        await _turns(3)
        (ref,) = lost
        self.assertIsNone(ref(), "the ended connection's protocol is only freed by the cycle collector")  # type: ignore[operator]

    async def test_inside_tls_termination_write_eof_is_refused_and_close_sends_close_notify(self) -> None:
        """Behind TerminateTLS, can_write_eof() is False (a FIN would cut TLS) and close() ends with close_notify."""

        class Answer(asyncio.Protocol):
            can_write_eof: list[bool] = []

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, asyncio.Transport)
                self.transport = transport

            def data_received(self, data: bytes) -> None:
                self.transport.write(b"answer to " + data)
                Answer.can_write_eof.append(self.transport.can_write_eof())
                if Answer.can_write_eof[-1]:
                    self.transport.write_eof()
                else:
                    self.transport.close()

        port, _, ca = terminating_mux(self, AsyncioProtocol(Answer))
        answer, ending = await wait(threads.deferToThread(fetch_over_tls, port, ca.cert_pem, b"question\n"), 20)
        self.assertEqual((answer, ending, Answer.can_write_eof), (b"answer to question\n", "close_notify", [False]))

    async def test_inside_tls_termination_no_data_reaches_a_protocol_after_its_close(self) -> None:
        """Behind TerminateTLS, bytes arriving after close() never reach data_received, as on asyncio's transports."""

        class CloseOnFirst(asyncio.Protocol):
            received: list[bytes] = []

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, asyncio.Transport)
                self.transport = transport

            def data_received(self, data: bytes) -> None:
                CloseOnFirst.received.append(data)
                self.transport.write(b"bye")
                self.transport.close()

            def eof_received(self) -> bool:
                CloseOnFirst.received.append(b"<eof>")
                return False

        def client(port: int, ca_pem: bytes) -> bytes:
            ctx = ssl.create_default_context(cadata=ca_pem.decode())
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname=NAME) as s:
                    s.sendall(b"first")
                    answer = s.recv(3)
                    s.sendall(b"second")
                    while chunk := s.recv(65536):
                        answer += chunk
                    return answer

        port, _, ca = terminating_mux(self, AsyncioProtocol(CloseOnFirst))
        answer = await wait(threads.deferToThread(client, port, ca.cert_pem), 20)
        self.assertEqual((answer, CloseOnFirst.received), (b"bye", [b"first"]))

    def test_factory_must_be_callable(self) -> None:
        """AsyncioProtocol(something not callable) is a clear TypeError."""
        with self.assertRaises(TypeError):
            AsyncioProtocol(42)  # type: ignore[arg-type]


def _sleep(seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater

    return wait(deferLater(R, seconds, lambda: None), seconds + 5)


async def _turns(n: int) -> None:
    for _ in range(n):
        await _sleep(0.01)
