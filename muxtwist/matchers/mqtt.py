"""
MQTT: a CONNECT packet, protocol name ``MQTT`` (levels 4 and 5, MQTT 3.1.1
and 5.0) or ``MQIsdp`` (level 3, MQTT 3.1).

Bytes read: the fixed header (packet type 1, flags 0, a 1-4 byte remaining
length), the protocol name, the level and the connect flags (reserved bit
clear, will QoS below 3, no will QoS or retain without a will). A bridge
(Mosquitto's ``try_private``) sets the top bit of the level, 0x83 to 0x85;
those are taken too. NEED_MORE bound: ``MAX_PREFIX`` (15) bytes.
"""

from __future__ import annotations

import attrs
from zope.interface import implementer

from muxtwist._rules import needs_bytes
from muxtwist.interfaces import ConnectionInfo, IMatcher, Verdict
from muxtwist.matchers import _options

__all__ = ["MAX_PREFIX", "MQTT"]

MATCH, NO_MATCH, NEED_MORE = Verdict.MATCH, Verdict.NO_MATCH, Verdict.NEED_MORE

MAX_PREFIX = 15
_NAMES = {b"\x00\x04MQTT": (4, 5), b"\x00\x06MQIsdp": (3,)}
#: The level without the bridge bit (0x80) a bridging broker may set.
_BRIDGE = 0x7F


def _remaining_length(data: bytes) -> tuple[Verdict, int, int]:
    """The variable-length integer after the first byte: (MATCH, value, next) or a verdict."""
    value = 0
    for i in range(4):
        if 1 + i >= len(data):
            return NEED_MORE, 0, 0
        byte = data[1 + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return MATCH, value, 2 + i
    return NO_MATCH, 0, 0


@needs_bytes
@implementer(IMatcher)
@attrs.frozen
class MQTT:
    """An MQTT CONNECT packet, protocol level 3, 4 or 5."""

    name: str = attrs.field(default="mqtt", kw_only=True, validator=_options.check_name)

    def match(self, data: bytes, info: ConnectionInfo) -> Verdict:
        if not data:
            return NEED_MORE
        if data[0] != 0x10:
            return NO_MATCH
        verdict, remaining, pos = _remaining_length(data)
        if verdict is not MATCH:
            return verdict
        seen = data[pos : pos + 8]
        for proto, levels in _NAMES.items():
            n = len(proto)
            if not (proto.startswith(seen) or seen.startswith(proto)):
                continue
            # Name, level, flags and keep-alive come before any payload.
            if remaining < n + 4:
                return NO_MATCH
            if len(data) < pos + n + 2:
                return NEED_MORE
            level, flags = data[pos + n], data[pos + n + 1]
            if (level & _BRIDGE) not in levels or flags & 0x01:
                return NO_MATCH
            will, will_qos, will_retain = flags & 0x04, (flags >> 3) & 0x03, flags & 0x20
            if will_qos == 3 or (not will and (will_qos or will_retain)):
                return NO_MATCH
            return MATCH
        return NO_MATCH
