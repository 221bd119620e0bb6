"""The ``twistd muxtwist`` command."""

import sys

from twisted.application.service import ServiceMaker

from _muxtwist_startup import running_muxtwist


def _running_muxtwist() -> bool:
    """Whether this process is ``twistd ... muxtwist ...`` (not another twistd command, nor a plugin scan)."""
    return running_muxtwist(sys.argv)


if _running_muxtwist():
    # twistd imports this module while it looks for its subcommands, long
    # before muxtwist's options are parsed: from here on a SIGHUP during
    # start-up is kept for a reload once serving, instead of killing us.
    from muxtwist._signals import hold_sighup

    hold_sighup()

muxtwist = ServiceMaker(
    "muxtwist",
    "muxtwist.tap",
    "Serve many protocols on one port: sniff each connection and hand it to the matching service.",
    "muxtwist",
)
