"""
Fuzz targets for the datagram parsers (QUIC, DNS, WireGuard, DTLS, STUN,
OpenVPN on UDP): arbitrary bytes, cut into up to four datagrams, must give
a verdict without raising. Shared by the atheris harnesses
``fuzz/fuzz_<name>.py`` and the hypothesis run in ``tests/test_fuzz_udp.py``.
"""

from __future__ import annotations

from collections.abc import Callable


def _datagrams(data: bytes) -> tuple[bytes, ...]:
    """The first byte says where to cut the rest into at most four datagrams."""
    if not data:
        return ()
    cuts, rest = data[0], data[1:]
    out, step = [], max(1, len(rest) // ((cuts & 3) + 1))
    for i in range(0, len(rest), step):
        out.append(rest[i : i + step])
    return tuple(out[:4]) or (b"",)


def _check(matchers: list[object], data: bytes) -> None:
    from muxtwist.interfaces import ConnectionInfo, Verdict
    from muxtwist.matchers.datagram import DatagramInfo

    grams = _datagrams(data)
    for m in matchers:
        for info in (DatagramInfo(datagrams=grams), ConnectionInfo()):
            verdict = m.match(b"".join(grams), info)  # type: ignore[attr-defined]
            assert isinstance(verdict, Verdict), (m, verdict)


def quic(data: bytes) -> None:
    from muxtwist.matchers.quic import QUIC, parse_initial_datagrams

    parse_initial_datagrams(_datagrams(data))
    _check([QUIC(), QUIC(sni="a.test", alpn="h3", versions="v2")], data)


def dns(data: bytes) -> None:
    from muxtwist.matchers.dns import DNS

    _check([DNS(), DNS(qname="*.test")], data)


def wireguard(data: bytes) -> None:
    from muxtwist.matchers.wireguard import WireGuard

    _check([WireGuard(), WireGuard(public_key=b"k" * 32)], data)


def dtls(data: bytes) -> None:
    from muxtwist.matchers.dtls import DTLS

    _check([DTLS(), DTLS(sni="d.test")], data)


def stun(data: bytes) -> None:
    from muxtwist.matchers.stun import STUN

    _check([STUN(), STUN(methods="binding")], data)


def openvpn_udp(data: bytes) -> None:
    from muxtwist.matchers.openvpn import OpenVPN

    _check([OpenVPN()], data)


#: harness name -> target.
UDP_TARGETS: dict[str, Callable[[bytes], None]] = {
    "quic": quic,
    "dns": dns,
    "wireguard": wireguard,
    "dtls": dtls,
    "stun": stun,
    "openvpn_udp": openvpn_udp,
}


def udp_seeds() -> dict[str, list[bytes]]:
    """
    Seed inputs per UDP harness: the real-format openers the hypothesis run
    in ``tests/test_fuzz_udp.py`` mutates (a QUIC Initial over two datagrams,
    a DNS query, a WireGuard initiation, DTLS ClientHello fragments, a STUN
    binding request, an OpenVPN hard reset); empty if the test helpers
    cannot be imported.
    """
    try:
        from tests.test_fuzz_udp import SEEDS
    except Exception:
        return {}
    return {name: [seed] for name, seed in SEEDS.items()}
