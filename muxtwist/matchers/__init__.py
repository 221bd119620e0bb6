"""
Matchers: pure functions from the first bytes of a connection to a verdict.

Every built-in matcher is also an :class:`~muxtwist.interfaces.IMatcherPlugin`
registered in ``twisted/plugins/muxtwist_matchers.py``; :func:`plugin` builds
any installed matcher, built-in or third-party, by name.
"""

from muxtwist.matchers._basic import AllOf, Any, AnyOf, Not, Prefix, Regex, RemoteAddress
from muxtwist.matchers._plugins import MatcherPlugin, plugin, plugins
from muxtwist.matchers.dns import DNS
from muxtwist.matchers.dtls import DTLS
from muxtwist.matchers.http import HTTP1
from muxtwist.matchers.http2 import GRPC, HTTP2, HTTP2Header
from muxtwist.matchers.info import ALPN, SNI
from muxtwist.matchers.mqtt import MQTT
from muxtwist.matchers.openvpn import OpenVPN
from muxtwist.matchers.postgresql import PostgreSQL
from muxtwist.matchers.proxy_protocol import ProxyProtocol
from muxtwist.matchers.quic import QUIC
from muxtwist.matchers.rdp import RDP
from muxtwist.matchers.redis import Redis
from muxtwist.matchers.socks import SOCKS4, SOCKS5
from muxtwist.matchers.ssh import SSH
from muxtwist.matchers.stun import STUN
from muxtwist.matchers.tls import TLS, ClientHello, parse_client_hello
from muxtwist.matchers.websocket import WebSocket
from muxtwist.matchers.wireguard import WireGuard
from muxtwist.matchers.xmpp import XMPP

__all__ = [
    "ALPN",
    "AllOf",
    "Any",
    "AnyOf",
    "ClientHello",
    "DNS",
    "DTLS",
    "GRPC",
    "HTTP1",
    "HTTP2",
    "HTTP2Header",
    "MQTT",
    "MatcherPlugin",
    "Not",
    "OpenVPN",
    "PostgreSQL",
    "Prefix",
    "ProxyProtocol",
    "QUIC",
    "RDP",
    "Redis",
    "Regex",
    "RemoteAddress",
    "SNI",
    "SOCKS4",
    "SOCKS5",
    "SSH",
    "STUN",
    "TLS",
    "WebSocket",
    "WireGuard",
    "XMPP",
    "parse_client_hello",
    "plugin",
    "plugins",
]
