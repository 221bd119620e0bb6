"""
Rule targets for the Python web stack: ASGI and WSGI applications and
asyncio protocols, served in-process on a sniffed connection.

Each target is an ordinary Twisted ``IProtocolFactory``, so it nests inside
``TerminateTLS`` and a nested ``SniffingFactory`` like any other target.

- :class:`AsyncioProtocol` runs any ``asyncio.Protocol`` factory (what
  ``loop.create_server`` takes) over the Twisted transport, through an
  adapter that behaves like an asyncio transport. A protocol that never
  touches the event loop runs under any reactor; one that does (streams,
  tasks, timers) needs Twisted's asyncio reactor.
- :class:`ASGI` serves an ASGI application with uvicorn's HTTP/1.1 and
  WebSocket protocol classes, driven through that same adapter, and ties the
  application's lifespan to ``doStart``/``doStop``. It needs the asyncio
  reactor (the application is asyncio code).
- :class:`WSGI` serves a WSGI application with ``twisted.web.wsgi`` on a
  bounded thread pool started and stopped with the factory.

The facade of the package: ``_asyncio`` holds the adapter and
:class:`AsyncioProtocol`, ``_asgi`` :class:`ASGI`, ``_wsgi`` :class:`WSGI`
(its connections in ``_wsgi_channel``, the pacing of its responses in
``_wsgi_pacing``); ``_http`` what both HTTP targets share.
"""

from muxtwist.apps._asgi import ASGI
from muxtwist.apps._asyncio import AsyncioProtocol, AsyncioReactorRequired, asyncio_loop
from muxtwist.apps._wsgi import WSGI

__all__ = ["ASGI", "WSGI", "AsyncioProtocol", "AsyncioReactorRequired", "asyncio_loop"]

for _public in (ASGI, WSGI, AsyncioProtocol, AsyncioReactorRequired, asyncio_loop):
    # Named where they are imported from, as before the package was split.
    _public.__module__ = __name__
del _public
