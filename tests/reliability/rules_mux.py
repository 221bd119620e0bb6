"""
The rules file the reliability scenarios run ``twistd muxtwist`` with: one
named echo per protocol, a diagnostics rule, and, when the scenario asks for
them, proxy rules to its backends. Settings come from the environment so
each scenario can tighten them.

- ``MUXREL_SNIFF_TIMEOUT``, ``MUXREL_MAX_SNIFF_BYTES``, ``MUXREL_SHUTDOWN_TIMEOUT``
- ``MUXREL_TRUST``: comma-separated CIDRs for ``accept_proxy_protocol``
- ``MUXREL_BACKENDS``: JSON ``{"name": "tcp:host=127.0.0.1:port=N", ...}``;
  a client reaches backend ``name`` by starting with ``BACKEND name\\n``
- ``MUXREL_CONNECT_TIMEOUT``: the proxies' connect timeout
"""

import json
import os

from muxtwist import Rule
from muxtwist.actions import Proxy
from muxtwist.matchers import (
    GRPC,
    HTTP1,
    HTTP2,
    MQTT,
    RDP,
    SOCKS4,
    SOCKS5,
    SSH,
    TLS,
    XMPP,
    OpenVPN,
    PostgreSQL,
    Prefix,
    Redis,
    Regex,
    WebSocket,
)
from tests.reliability.services import Diag, NamedEcho

sniff_timeout = float(os.environ.get("MUXREL_SNIFF_TIMEOUT", "5"))
max_sniff_bytes = int(os.environ.get("MUXREL_MAX_SNIFF_BYTES", "16384"))
shutdown_timeout = float(os.environ.get("MUXREL_SHUTDOWN_TIMEOUT", "10"))
if os.environ.get("MUXREL_TRUST"):
    accept_proxy_protocol = os.environ["MUXREL_TRUST"].split(",")

_connect_timeout = float(os.environ.get("MUXREL_CONNECT_TIMEOUT", "1"))
_backends = json.loads(os.environ.get("MUXREL_BACKENDS", "{}"))

rules = [Rule(Prefix(b"DIAG\n", name="diag"), Diag())]
rules += [
    Rule(Prefix(f"BACKEND {name}\n", name=f"backend-{name}"), Proxy(description, connect_timeout=_connect_timeout))
    for name, description in sorted(_backends.items())
]
rules += [
    Rule(TLS(), NamedEcho("tls")),
    Rule(SSH(), NamedEcho("ssh")),
    Rule(WebSocket(), NamedEcho("websocket")),
    Rule(HTTP1(host="www.example.com", name="http1-www"), NamedEcho("http1-www")),
    Rule(HTTP1(), NamedEcho("http1")),
    Rule(GRPC(), NamedEcho("grpc")),
    Rule(HTTP2(), NamedEcho("http2")),
    Rule(Redis(), NamedEcho("redis")),
    Rule(PostgreSQL(), NamedEcho("postgresql")),
    Rule(MQTT(), NamedEcho("mqtt")),
    Rule(SOCKS5(), NamedEcho("socks5")),
    Rule(SOCKS4(), NamedEcho("socks4")),
    Rule(OpenVPN(), NamedEcho("openvpn")),
    Rule(XMPP(), NamedEcho("xmpp")),
    Rule(RDP(), NamedEcho("rdp")),
    Rule(Prefix(b"MUXECHO ", name="prefix"), NamedEcho("prefix")),
    Rule(Regex(rb"\A\d+ [A-Z]+\r\n", min_length=16, name="regex"), NamedEcho("regex")),
]
