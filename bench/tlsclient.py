"""
A TLS handshake load generator: threads that each open a connection, do a
full handshake (no session resumption), send one small HTTP request, read
the response and close, for a fixed time. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import threading
import time

REQUEST = b"GET / HTTP/1.1\r\nHost: bench.test\r\nConnection: close\r\n\r\n"


def _worker(port: int, sni: str, until: float, counts: list[int], slot: int, errors: list[int]) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    while time.monotonic() < until:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with context.wrap_socket(raw, server_hostname=sni) as tls:
                    tls.sendall(REQUEST)
                    got = b""
                    while b"\r\n\r\n" not in got:
                        chunk = tls.recv(4096)
                        if not chunk:
                            break
                        got += chunk
                    if not got.startswith(b"HTTP/1.1 200"):
                        raise OSError("no 200 response")
            counts[slot] += 1
        except OSError:
            errors[slot] += 1


def main() -> None:
    """Run the handshake loop and print its figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.tlsclient")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--sni", default="bench.test")
    parser.add_argument("--concurrency", type=int, default=2)
    options = parser.parse_args()
    counts = [0] * options.concurrency
    errors = [0] * options.concurrency
    start = time.monotonic()
    until = start + options.seconds
    threads = [
        threading.Thread(target=_worker, args=(options.port, options.sni, until, counts, i, errors))
        for i in range(options.concurrency)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    print(json.dumps({"handshakes_s": sum(counts) / elapsed, "handshakes": sum(counts), "errors": sum(errors)}))


if __name__ == "__main__":
    main()
