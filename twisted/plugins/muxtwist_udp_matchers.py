"""
The datagram matchers (QUIC, DNS, WireGuard, DTLS, STUN), registered as
IMatcherPlugins so that ``muxtwist.matchers.plugin(name, **options)`` builds
them by name. OpenVPN, which reads both transports, is in muxtwist_protocols.
"""

from muxtwist import matchers as _m
from muxtwist.matchers._plugins import MatcherPlugin

quic = MatcherPlugin("quic", _m.QUIC, "QUIC v1/v2 Initial packets, decrypted, by the ClientHello's SNI and ALPN")
dns = MatcherPlugin("dns", _m.DNS, "a DNS query (header and question), on UDP or TCP")
wireguard = MatcherPlugin("wireguard", _m.WireGuard, "a WireGuard handshake initiation")
dtls = MatcherPlugin("dtls", _m.DTLS, "a DTLS ClientHello, by SNI and ALPN")
stun = MatcherPlugin("stun", _m.STUN, "a STUN or TURN request or indication")
