"""The ``twistd muxtwist`` command."""

from twisted.application.service import ServiceMaker

muxtwist = ServiceMaker(
    "muxtwist",
    "muxtwist.tap",
    "Serve many protocols on one port: sniff each connection and hand it to the matching service.",
    "muxtwist",
)
