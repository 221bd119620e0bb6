"""
Matchers: pure functions from the first bytes of a connection to a verdict.

Every built-in matcher is also an :class:`~muxtwist.interfaces.IMatcherPlugin`
registered in ``twisted/plugins/muxtwist_matchers.py``; :func:`plugin` builds
any installed matcher, built-in or third-party, by name.
"""

from typing import TYPE_CHECKING

from muxtwist._lazy import lazy_attributes

if TYPE_CHECKING:
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

# Each matcher module is imported when one of its names is first read, so a
# program that uses one matcher does not load the others (QUIC needs cryptography).
_LAZY = {
    "ALPN": "muxtwist.matchers.info",
    "AllOf": "muxtwist.matchers._basic",
    "Any": "muxtwist.matchers._basic",
    "AnyOf": "muxtwist.matchers._basic",
    "ClientHello": "muxtwist.matchers.tls",
    "DNS": "muxtwist.matchers.dns",
    "DTLS": "muxtwist.matchers.dtls",
    "GRPC": "muxtwist.matchers.http2",
    "HTTP1": "muxtwist.matchers.http",
    "HTTP2": "muxtwist.matchers.http2",
    "HTTP2Header": "muxtwist.matchers.http2",
    "MQTT": "muxtwist.matchers.mqtt",
    "MatcherPlugin": "muxtwist.matchers._plugins",
    "Not": "muxtwist.matchers._basic",
    "OpenVPN": "muxtwist.matchers.openvpn",
    "PostgreSQL": "muxtwist.matchers.postgresql",
    "Prefix": "muxtwist.matchers._basic",
    "ProxyProtocol": "muxtwist.matchers.proxy_protocol",
    "QUIC": "muxtwist.matchers.quic",
    "RDP": "muxtwist.matchers.rdp",
    "Redis": "muxtwist.matchers.redis",
    "Regex": "muxtwist.matchers._basic",
    "RemoteAddress": "muxtwist.matchers._basic",
    "SNI": "muxtwist.matchers.info",
    "SOCKS4": "muxtwist.matchers.socks",
    "SOCKS5": "muxtwist.matchers.socks",
    "SSH": "muxtwist.matchers.ssh",
    "STUN": "muxtwist.matchers.stun",
    "TLS": "muxtwist.matchers.tls",
    "WebSocket": "muxtwist.matchers.websocket",
    "WireGuard": "muxtwist.matchers.wireguard",
    "XMPP": "muxtwist.matchers.xmpp",
    "parse_client_hello": "muxtwist.matchers.tls",
    "plugin": "muxtwist.matchers._plugins",
    "plugins": "muxtwist.matchers._plugins",
}

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

__getattr__, __dir__ = lazy_attributes(globals(), _LAZY)
