"""
The Python floor of scenario 3: ``python -m bench.tcpfloor --port N
--http-backend H --other-backend O``.

The least a Python proxy can do for the same work as muxtwist's ``Proxy``
in scenario 3: one ``epoll`` loop, level-triggered; each accepted
connection's first bytes decide the backend (an HTTP method: ``H``; anything
else: ``O``), a non-blocking ``connect``, then ``recv``/``send`` both ways
with a buffer of one read per direction, half-close passed on, both sockets
closed once both directions have ended. No framework, no timeouts, no
limits, no logging, no counters, no backend failover, no ``splice``. Its
figures are what CPython on this machine allows for the system calls of a
proxied connection: how much of muxtwist's cost is the work itself and how
much is the framework around it.
"""

from __future__ import annotations

import argparse
import errno
import select
import socket
from typing import Any

METHODS = (b"GET ", b"HEAD", b"POST", b"PUT ", b"DELE", b"OPTI", b"PATC")
CHUNK = 65536


class _End:
    """One socket of a relayed connection and what is waiting to be written to it."""

    __slots__ = ("fd", "peer", "pending", "read_done", "sock", "write_done")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer: _End | None = None
        self.pending = b""  # read from the peer, not yet written here
        self.read_done = False  # the peer of this end has nothing more for us
        self.write_done = False  # shut down for writing


class FloorProxy:
    def __init__(self, port: int, http: int, other: int) -> None:
        self.listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listening.bind(("127.0.0.1", port))
        self.listening.listen(1024)
        self.listening.setblocking(False)
        self.backends = {True: ("127.0.0.1", http), False: ("127.0.0.1", other)}
        self.poller = select.epoll()
        self.poller.register(self.listening.fileno(), select.EPOLLIN)
        self.sniffing: dict[int, socket.socket] = {}
        self.connecting: dict[int, tuple[_End, _End]] = {}  # backend fd -> (client, backend)
        self.ends: dict[int, _End] = {}

    def run(self) -> None:
        listening_fd = self.listening.fileno()
        while True:
            for fd, mask in self.poller.poll():
                if fd == listening_fd:
                    self._accept()
                elif fd in self.sniffing:
                    self._sniff(fd)
                elif fd in self.connecting:
                    self._connected(fd)
                else:
                    end = self.ends.get(fd)
                    if end is None:
                        continue
                    if mask & (select.EPOLLOUT | select.EPOLLERR):
                        self._flush(end)
                    if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and fd in self.ends:
                        self._relay(end)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listening.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            self.sniffing[sock.fileno()] = sock
            self.poller.register(sock.fileno(), select.EPOLLIN)

    def _sniff(self, fd: int) -> None:
        sock = self.sniffing.pop(fd)
        try:
            first = sock.recv(CHUNK)
        except BlockingIOError:
            self.sniffing[fd] = sock
            return
        except OSError:
            first = b""
        self.poller.unregister(fd)
        if not first:
            sock.close()
            return
        backend = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        backend.setblocking(False)
        code = backend.connect_ex(self.backends[first.startswith(METHODS)])
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            backend.close()
            return
        client_end, backend_end = _End(sock), _End(backend)
        client_end.peer, backend_end.peer = backend_end, client_end
        backend_end.pending = first
        self.connecting[backend_end.fd] = (client_end, backend_end)
        self.poller.register(backend_end.fd, select.EPOLLOUT)

    def _connected(self, fd: int) -> None:
        client_end, backend_end = self.connecting.pop(fd)
        if backend_end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.poller.unregister(fd)
            client_end.sock.close()
            backend_end.sock.close()
            return
        self.ends[client_end.fd] = client_end
        self.ends[fd] = backend_end
        self.poller.modify(fd, select.EPOLLIN)
        self.poller.register(client_end.fd, select.EPOLLIN)
        self._flush(backend_end)

    def _relay(self, end: _End) -> None:
        """``end`` is readable: move one read to its peer."""
        peer = end.peer
        assert peer is not None
        if peer.pending:
            return  # the peer's buffer is full; reading resumes once it drains
        try:
            data = end.sock.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            peer.read_done = True
            self._watch(end)
        else:
            peer.pending = data
        self._flush(peer)

    def _flush(self, end: _End) -> None:
        """Write what is waiting for ``end``; pass on an end of input once all is written."""
        if end.pending:
            try:
                sent = end.sock.send(end.pending)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close(end)
                return
            end.pending = end.pending[sent:]
        if not end.pending and end.read_done and not end.write_done:
            end.write_done = True
            try:
                end.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        peer = end.peer
        assert peer is not None
        if end.write_done and peer.write_done:
            self._close(end)
            return
        self._watch(end)
        self._watch(peer)

    def _watch(self, end: _End) -> None:
        """Read ``end`` unless its input ended or its peer's buffer is full; watch for writing while it has some."""
        if end.fd not in self.ends:
            return
        peer = end.peer
        assert peer is not None
        mask = 0
        if not peer.read_done and not peer.pending:
            mask |= select.EPOLLIN
        if end.pending:
            mask |= select.EPOLLOUT
        self.poller.modify(end.fd, mask)

    def _close(self, end: _End) -> None:
        for one in (end, end.peer):
            assert one is not None
            if self.ends.pop(one.fd, None) is not None:
                self.poller.unregister(one.fd)
                one.sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tcpfloor")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--http-backend", type=int, required=True)
    parser.add_argument("--other-backend", type=int, required=True)
    options = parser.parse_args(argv)
    FloorProxy(options.port, options.http_backend, options.other_backend).run()


if __name__ == "__main__":
    main()


__all__: list[Any] = ["FloorProxy", "main"]
