"""
Embedding muxtwist in an asyncio program.

Inside ``asyncio.run(...)``::

    server = await muxtwist.aio.serve(rules, "tcp:3000")
    ...
    await server.close()

:func:`serve` installs Twisted's asyncio reactor on the running event loop
(or reuses it when it is already there), starts it without taking the loop
over (``asyncio.run`` keeps running the loop), and serves ``rules`` with a
:class:`~muxtwist.service.MuxService`. :meth:`Server.close` stops like
``MuxService.stopService``: stop accepting, let handed-off connections
finish for up to ``shutdown_timeout`` seconds, abort the rest, and then wait
for the ASGI applications' lifespan shutdown.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IProtocolFactory
from twisted.logger import Logger

from muxtwist._twisted import asyncio_loop_of, reactor_started
from muxtwist.apps import ASGI, AsyncioReactorRequired
from muxtwist.service import MuxService
from muxtwist.sniffing import Rule, SniffingFactory

__all__ = ["AsyncioReactorRequired", "Server", "install_reactor", "serve"]

log = Logger()


def install_reactor(loop: asyncio.AbstractEventLoop | None = None) -> Any:
    """
    The Twisted reactor running on ``loop`` (the running loop by default):
    Twisted's asyncio reactor, installed now if no reactor is installed yet,
    and started without running the loop (whoever runs the loop runs it).

    :raises AsyncioReactorRequired: when another reactor is already installed
        (``twisted.internet.reactor`` was imported first), or the asyncio
        reactor is installed on a different event loop.
    """
    if loop is None:
        loop = asyncio.get_running_loop()
    from twisted.internet import asyncioreactor

    reactor: Any = sys.modules.get("twisted.internet.reactor")
    if reactor is None:
        if not isinstance(loop, asyncio.SelectorEventLoop):
            raise AsyncioReactorRequired(
                f"Twisted's asyncio reactor needs a selector event loop, and this loop is {type(loop).__name__}"
            )
        asyncioreactor.install(loop)
        from twisted.internet import reactor as installed

        reactor = installed
    elif not isinstance(reactor, asyncioreactor.AsyncioSelectorReactor):
        raise AsyncioReactorRequired(
            "muxtwist.aio needs Twisted's asyncio reactor, but another reactor is already installed: "
            f"{type(reactor).__module__}.{type(reactor).__qualname__}. Something imported "
            "twisted.internet.reactor before muxtwist.aio.serve ran: call muxtwist.aio.install_reactor() "
            "first thing inside asyncio.run, before importing code that imports the reactor"
        )
    elif asyncio_loop_of(reactor) is not loop:
        raise AsyncioReactorRequired(
            "Twisted's asyncio reactor is installed on a different event loop than the running one; "
            "one process has one reactor: serve from the loop it was installed on"
        )
    r: Any = reactor
    if not r.running and not reactor_started(r):
        r.startRunning(installSignalHandlers=False)
    return r


def _factories(factory: object, seen: set[int] | None = None) -> Iterator[object]:
    """``factory`` and every factory nested in it: rule targets, TLS-wrapped sniffers."""
    seen = set() if seen is None else seen
    if id(factory) in seen:
        return
    seen.add(id(factory))
    yield factory
    if isinstance(factory, SniffingFactory):
        inner: list[object] = [r.factory for r in factory.rules] + [factory.on_timeout, factory.on_no_match]
    else:
        inner = [getattr(factory, name, None) for name in ("factory", "wrappedFactory")]
    for f in inner:
        if f is not None and IProtocolFactory.providedBy(f):
            yield from _factories(f, seen)


class Server:
    """A running :func:`serve`: its listening addresses, and :meth:`close`."""

    def __init__(self, service: MuxService, factory: SniffingFactory) -> None:
        self.service = service
        self.factory = factory

    @property
    def addresses(self) -> list[IAddress]:
        """The address each listener is bound to (the port chosen for ``tcp:0``)."""
        return [listener.port.getHost() for listener in self.service.listeners.values() if listener.port is not None]

    @property
    def port(self) -> int:
        """The TCP port of the first listener."""
        return int(getattr(self.addresses[0], "port", 0))

    def _asgi_targets(self) -> list[ASGI]:
        return [f for f in _factories(self.factory) if isinstance(f, ASGI)]

    def _wsgi_targets(self) -> list[Any]:
        # Not imported here: twisted.web.server would install the default reactor.
        # No WSGI target exists unless its module was imported.
        module = sys.modules.get("muxtwist.apps._wsgi")
        if module is None:
            return []
        return [f for f in _factories(self.factory) if isinstance(f, module.WSGI)]

    async def started(self) -> None:
        """Wait for every ASGI application's lifespan startup; raise if one failed."""
        for target in self._asgi_targets():
            if not await _future(target.when_started()):
                raise RuntimeError(f"{target!r} failed its lifespan startup")

    async def close(self) -> None:
        """Stop accepting, drain for up to ``shutdown_timeout``, abort the rest, run the lifespan shutdowns."""
        targets = self._asgi_targets()
        if self.service.running:
            stopping = self.service.stopService()
            # Under twistd the reactor's shutdown asks the ASGI connections to
            # finish; here nothing else would, and an idle keep-alive
            # connection held the stop for shutdown_timeout, then was reset.
            for target in targets:
                target.shutdown()
            for wsgi in self._wsgi_targets():
                wsgi.shutdown()
            await _future(stopping)
        for target in targets:
            await _future(target.when_stopped())

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def serve(
    rules: Sequence[Rule] | SniffingFactory,
    endpoint: str | Sequence[str] = "tcp:3000",
    *,
    shutdown_timeout: float = 30.0,
    **options: Any,
) -> Server:
    """
    Serve ``rules`` (or a ready :class:`SniffingFactory`) on ``endpoint``
    (an endpoint description or a port number, or several) from the running
    asyncio loop; returns once listening and once every ASGI application's
    lifespan startup is done. ``options`` go to :class:`SniffingFactory`.
    """
    reactor = install_reactor()
    if isinstance(rules, SniffingFactory):
        if options:
            raise TypeError("options apply to the SniffingFactory serve builds; pass them to your own instead")
        factory = rules
    else:
        factory = SniffingFactory(rules, reactor=reactor, **options)
    descriptions = [endpoint] if isinstance(endpoint, str | int) else list(endpoint)
    service = MuxService(shutdown_timeout=shutdown_timeout, reactor=reactor)
    for description in descriptions:
        service.add_listener(str(description), factory)
    server = Server(service, factory)
    try:
        service.privilegedStartService()
        service.startService()
        await server.started()
    except BaseException:
        await server.close()
        raise
    return server


def _future(d: defer.Deferred[Any]) -> asyncio.Future[Any]:
    return d.asFuture(asyncio.get_running_loop())
