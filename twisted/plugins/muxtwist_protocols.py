"""
The protocol matchers (TLS, HTTP/2, gRPC, WebSocket, SSH, databases, MQTT,
SOCKS, OpenVPN, XMPP, RDP), registered as IMatcherPlugins so that
``muxtwist.matchers.plugin(name, **options)`` builds them by name.
"""

from muxtwist import matchers as _m
from muxtwist.matchers._plugins import MatcherPlugin

tls = MatcherPlugin("tls", _m.TLS, "a TLS ClientHello, by SNI, ALPN and version")
http2 = MatcherPlugin("http2", _m.HTTP2, "the HTTP/2 prior-knowledge preface")
http2_header = MatcherPlugin("http2_header", _m.HTTP2Header, "an HTTP/2 request header, decoded with hpack")
grpc = MatcherPlugin("grpc", _m.GRPC, "an HTTP/2 request with content-type application/grpc*")
websocket = MatcherPlugin("websocket", _m.WebSocket, "a WebSocket opening handshake")
ssh = MatcherPlugin("ssh", _m.SSH, "an SSH 2.0 identification line")
redis = MatcherPlugin("redis", _m.Redis, "a Redis command, RESP or inline")
postgresql = MatcherPlugin("postgresql", _m.PostgreSQL, "a PostgreSQL startup, SSL, GSS or cancel request")
mqtt = MatcherPlugin("mqtt", _m.MQTT, "an MQTT CONNECT, levels 3 to 5")
socks4 = MatcherPlugin("socks4", _m.SOCKS4, "a SOCKS4 or SOCKS4a request")
socks5 = MatcherPlugin("socks5", _m.SOCKS5, "a SOCKS5 greeting")
openvpn = MatcherPlugin("openvpn", _m.OpenVPN, "an OpenVPN TCP hard-reset packet")
xmpp = MatcherPlugin("xmpp", _m.XMPP, "an XMPP stream header")
rdp = MatcherPlugin("rdp", _m.RDP, "an RDP X.224 connection request")
