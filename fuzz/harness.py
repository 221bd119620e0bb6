"""
The atheris entry point shared by the ``fuzz_<name>.py`` scripts: instrument
muxtwist, then fuzz one target of :mod:`targets`.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]


def main(name: str) -> None:
    import atheris

    with atheris.instrument_imports(include=["muxtwist", "hpack"]):
        import muxtwist.matchers
        import muxtwist.proxyprotocol
        import muxtwist.redirect  # noqa: F401

    from targets import TARGETS

    atheris.Setup(sys.argv, TARGETS[name])
    atheris.Fuzz()
