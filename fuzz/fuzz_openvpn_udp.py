"""atheris harness: the openvpn_udp datagram parser (see udp_targets.py)."""

import os
import sys

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports(include=["muxtwist"]):
        import muxtwist.matchers  # noqa: F401
    from udp_targets import UDP_TARGETS

    atheris.Setup(sys.argv, UDP_TARGETS["openvpn_udp"])
    atheris.Fuzz()
