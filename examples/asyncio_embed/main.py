"""
An asyncio program that embeds muxtwist: one port serves a small ASGI
application and an ``asyncio.start_server``-style line protocol, while the
program's own asyncio task keeps counting ticks::

    python examples/asyncio_embed/main.py tcp:3000
    curl http://127.0.0.1:3000/                 # ticks so far: 12
    printf 'ECHO hi\\n' | nc -N 127.0.0.1 3000    # ECHO HI

SIGTERM or SIGINT closes the server (draining connections) and the program.
"""

import asyncio
import signal
import sys

import muxtwist.aio
from muxtwist import Rule
from muxtwist.apps import ASGI, AsyncioProtocol
from muxtwist.matchers import HTTP1, Prefix

ticks = 0


async def count_ticks() -> None:
    global ticks
    while True:
        await asyncio.sleep(0.1)
        ticks += 1


async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def, type-arg]
    """A bare ASGI application: the tick count as text."""
    if scope["type"] != "http":
        return
    body = f"ticks so far: {ticks}\n".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


async def shout(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Each line back in capitals, until the client half-closes."""
    while line := await reader.readline():
        writer.write(line.upper())
        await writer.drain()
    writer.close()


def line_protocol() -> asyncio.StreamReaderProtocol:
    return asyncio.StreamReaderProtocol(asyncio.StreamReader(), shout)


async def main(endpoint: str) -> None:
    server = await muxtwist.aio.serve(
        [Rule(HTTP1(), ASGI(app), name="web"), Rule(Prefix(b"ECHO"), AsyncioProtocol(line_protocol), name="echo")],
        endpoint,
        shutdown_timeout=5.0,
    )
    print(f"serving on port {server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    ticker = asyncio.create_task(count_ticks())
    await stop.wait()
    ticker.cancel()
    await server.close()
    print("closed", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "tcp:3000"))
