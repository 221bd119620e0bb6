"""
Write the intersphinx inventories the docs build reads instead of fetching
them (the build has no network): for Twisted, Python and pyOpenSSL, the names
our docs and docstrings refer to, each pointing at its page in that
project's published documentation.

Run from anywhere after adding a name: ``python docs/_inventories/make_inventories.py``.
The files are sphinx's inventory format, version 2 (as ``objects.inv``).
"""

from __future__ import annotations

import os
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))

# Twisted's API docs (pydoctor): one page per class or module, members as anchors.
TWISTED_CLASSES = [
    "twisted.application.internet.StreamServerEndpointService",
    "twisted.application.service.IService",
    "twisted.application.service.MultiService",
    "twisted.application.service.Service",
    "twisted.internet.defer.Deferred",
    "twisted.internet.endpoints.AdoptedStreamServerEndpoint",
    "twisted.internet.interfaces.IAddress",
    "twisted.internet.interfaces.IHalfCloseableProtocol",
    "twisted.internet.interfaces.IListeningPort",
    "twisted.internet.interfaces.IProtocol",
    "twisted.internet.interfaces.IProtocolFactory",
    "twisted.internet.interfaces.IPushProducer",
    "twisted.internet.interfaces.IReactorCore",
    "twisted.internet.interfaces.IReactorFDSet",
    "twisted.internet.interfaces.IReactorTCP",
    "twisted.internet.interfaces.IReactorTime",
    "twisted.internet.interfaces.IReactorUDP",
    "twisted.internet.interfaces.IStreamClientEndpoint",
    "twisted.internet.interfaces.IStreamServerEndpoint",
    "twisted.internet.interfaces.ITransport",
    "twisted.internet.protocol.DatagramProtocol",
    "twisted.internet.protocol.Factory",
    "twisted.internet.protocol.Protocol",
    "twisted.internet.protocol.ServerFactory",
    "twisted.internet.task.Clock",
    "twisted.internet.testing.MemoryReactorClock",
    "twisted.internet.testing.StringTransport",
    "twisted.internet.address.IPv4Address",
    "twisted.internet.address.IPv6Address",
    "twisted.internet.address.UNIXAddress",
    "twisted.internet.error.ConnectionDone",
    "twisted.internet.error.ConnectionLost",
    "twisted.internet.interfaces.IConsumer",
    "twisted.internet.interfaces.IHandshakeListener",
    "twisted.internet.interfaces.IPullProducer",
    "twisted.internet.interfaces.IReactorSocket",
    "twisted.internet.interfaces.ISSLTransport",
    "twisted.internet.interfaces.ITCPTransport",
    "twisted.internet.protocol.ClientFactory",
    "twisted.logger.ILogObserver",
    "twisted.logger.Logger",
    "twisted.protocols.tls.TLSMemoryBIOFactory",
    "twisted.protocols.tls.TLSMemoryBIOProtocol",
    "twisted.python.failure.Failure",
    "twisted.python.usage.Options",
    "twisted.web.resource.IResource",
    "twisted.plugin.IPlugin",
    "twisted.trial.unittest.SynchronousTestCase",
    "twisted.trial.unittest.TestCase",
    "twisted.web.resource.Resource",
    "twisted.web.server.Request",
    "twisted.web.server.Site",
]
TWISTED_METHODS = [
    "twisted.application.service.IService.startService",
    "twisted.application.service.IService.stopService",
    "twisted.application.service.MultiService.startService",
    "twisted.application.service.MultiService.stopService",
    "twisted.internet.interfaces.IProtocolFactory.buildProtocol",
    "twisted.internet.interfaces.IProtocolFactory.doStart",
    "twisted.internet.interfaces.IProtocolFactory.doStop",
]
TWISTED_FUNCTIONS = [
    "twisted.internet.endpoints.serverFromString",
    "twisted.internet.endpoints.clientFromString",
    "twisted.plugin.getPlugins",
]
TWISTED_MODULES = [
    "twisted.internet.endpoints",
    "twisted.internet.interfaces",
    "twisted.logger",
    "twisted.plugin",
    "twisted.web",
]

# Python's library docs: a page per module, every object an anchor on it.
PYTHON = {
    "py:class": [
        ("collections.abc.Callable", "library/collections.abc.html"),
        ("collections.abc.Iterable", "library/collections.abc.html"),
        ("collections.abc.Iterator", "library/collections.abc.html"),
        ("collections.abc.Mapping", "library/collections.abc.html"),
        ("collections.abc.Sequence", "library/collections.abc.html"),
        ("enum.Enum", "library/enum.html"),
        ("ipaddress.IPv4Network", "library/ipaddress.html"),
        ("ipaddress.IPv6Network", "library/ipaddress.html"),
        ("os.PathLike", "library/os.html"),
        ("re.Pattern", "library/re.html"),
        ("asyncio.AbstractEventLoop", "library/asyncio-eventloop.html"),
        ("asyncio.Protocol", "library/asyncio-protocol.html"),
        ("asyncio.DatagramProtocol", "library/asyncio-protocol.html"),
        ("int", "library/functions.html"),
        ("float", "library/functions.html"),
        ("str", "library/stdtypes.html"),
        ("bytes", "library/stdtypes.html"),
        ("bool", "library/functions.html"),
        ("dict", "library/stdtypes.html"),
        ("list", "library/stdtypes.html"),
        ("tuple", "library/stdtypes.html"),
        ("frozenset", "library/stdtypes.html"),
        ("object", "library/functions.html"),
        ("memoryview", "library/stdtypes.html"),
    ],
    "py:exception": [
        ("ValueError", "library/exceptions.html"),
        ("TypeError", "library/exceptions.html"),
        ("OSError", "library/exceptions.html"),
        ("Exception", "library/exceptions.html"),
    ],
    "py:data": [("None", "library/constants.html")],
    "py:module": [
        ("asyncio", "library/asyncio.html"),
        ("enum", "library/enum.html"),
        ("ssl", "library/ssl.html"),
    ],
}

PYOPENSSL = {
    "py:class": [
        ("OpenSSL.SSL.Context", "api/ssl.html"),
        ("OpenSSL.SSL.Connection", "api/ssl.html"),
    ],
}


def write(path: str, project: str, version: str, entries: list[tuple[str, str, str]]) -> None:
    """``entries``: (name, domain:role, uri relative to the project's base URL)."""
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    body = "".join(f"{name} {role} 1 {uri} -\n" for name, role, uri in sorted(set(entries)))
    with open(path, "wb") as f:
        f.write(header.encode() + zlib.compress(body.encode()))


def main() -> None:
    twisted: list[tuple[str, str, str]] = []
    for name in TWISTED_CLASSES:
        twisted.append((name, "py:class", f"{name}.html"))
    for name in TWISTED_METHODS:
        owner, _, method = name.rpartition(".")
        twisted.append((name, "py:method", f"{owner}.html#{method}"))
    for name in TWISTED_FUNCTIONS:
        module, _, function = name.rpartition(".")
        twisted.append((name, "py:function", f"{module}.html#{function}"))
    for name in TWISTED_MODULES:
        twisted.append((name, "py:module", f"{name}.html"))
    write(os.path.join(HERE, "twisted.inv"), "Twisted", "24", twisted)
    python = [(name, role, f"{page}#{name}") for role, items in PYTHON.items() for name, page in items]
    write(os.path.join(HERE, "python.inv"), "Python", "3", python)
    pyopenssl = [(name, role, f"{page}#{name}") for role, items in PYOPENSSL.items() for name, page in items]
    write(os.path.join(HERE, "pyopenssl.inv"), "pyOpenSSL", "24", pyopenssl)


if __name__ == "__main__":
    main()
