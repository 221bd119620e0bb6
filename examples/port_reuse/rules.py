"""
HTTP, SSH and Redis behind one port, each relayed to its own server: the
"port reuse" setup people build with nginx's ``ssl_preread`` or HAProxy's
``req.payload`` rules, as a rules file.

The backends' addresses come from the environment so that the test suite can
start throwaway servers on free ports; in production write them in::

    NGINX_PORT=8080 SSHD_PORT=22 REDIS_PORT=6379 \\
        twistd -n muxtwist --port 3000 --config examples/port_reuse/rules.py
    curl http://127.0.0.1:3000/
    redis-cli -p 3000 PING
    ssh -p 3000 you@127.0.0.1

Each backend is health-checked; a backend that fails its checks is taken
out of rotation and a client that finds none closes at once.
"""

import os

from muxtwist import Rule
from muxtwist.actions import HealthCheck, Proxy
from muxtwist.matchers import HTTP1, SSH, Redis


def backend(variable: str) -> str:
    """A client endpoint description for the loopback port in ``variable``."""
    return f"tcp:host=127.0.0.1:port={int(os.environ[variable])}"


ssh = Proxy(backend("SSHD_PORT"), health_check=HealthCheck(expect=b"SSH-"))

rules = [
    Rule(
        HTTP1(),
        Proxy(backend("NGINX_PORT"), health_check=HealthCheck(send=b"HEAD / HTTP/1.0\r\n\r\n", expect=b"HTTP/1.")),
        name="web",
    ),
    Rule(SSH(), ssh, name="ssh"),
    Rule(
        Redis(),
        Proxy(backend("REDIS_PORT"), health_check=HealthCheck(send=b"PING\r\n", expect=b"+PONG")),
        name="redis",
    ),
]

# OpenSSH clients send their banner first, but some SSH clients wait for the
# server's: give connections that stay silent to sshd too.
on_timeout = ssh
sniff_timeout = 2.0
