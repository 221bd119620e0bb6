"""
A backend for the proxy scenarios, run as its own process
(``python -m tests.reliability.backend MODE``) so it can be killed:

- ``echo``: write ``"echo <peer>\\n"``, then echo;
- ``reset``: the same, but reset the connection after ``--after`` bytes;
- ``slow``: greet, read nothing for ``--pause`` seconds, then echo;
- ``answer``: read one line ending in ``<id> <size>``, write :func:`answer_for`
  of it (``size`` seeded bytes, no greeting), and close (over TLS with
  ``--tls PEM``, a certificate and key in one file: a ``close_notify``;
  with ``--pause-answer``, only ``--pause`` seconds after the line).

It listens on 127.0.0.1, an ephemeral port, and prints ``PORT <n>`` once ready.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import ssl
import struct
import sys


def answer_for(line: bytes) -> bytes:
    """What ``answer`` mode writes for a request line ending in ``<id> <size>``."""
    ident, size = line.split()[-2:]
    return random.Random(ident).randbytes(int(size))


async def _serve(args: argparse.Namespace) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if args.mode == "answer":
            try:
                line = await reader.readline()
                # A client's half-close, if it were passed on, arrives meanwhile.
                await asyncio.sleep(args.pause if args.pause_answer else 0)
                writer.write(answer_for(line))
                await writer.drain()
            except (OSError, ValueError):
                pass
            finally:
                writer.close()
            return
        peer = writer.get_extra_info("peername")
        writer.write(f"echo {peer[0]}\n".encode())
        if args.mode == "slow":
            await asyncio.sleep(args.pause)
        seen = 0
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                seen += len(data)
                writer.write(data)
                await writer.drain()
                if args.mode == "reset" and seen >= args.after:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
            writer.write_eof()
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    context = None
    if args.tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls)
    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024, ssl=context)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["echo", "reset", "slow", "answer"])
    parser.add_argument("--after", type=int, default=65536)
    parser.add_argument("--pause", type=float, default=3.0)
    parser.add_argument("--tls", help="serve TLS with this PEM file (certificate and key)")
    parser.add_argument("--pause-answer", action="store_true", help="answer mode: wait --pause seconds first")
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
