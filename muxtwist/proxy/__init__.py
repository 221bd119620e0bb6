"""
The proxy action: relay a sniffed connection to one of several backends.

The facade of the package; each concern has a module of its own:

- ``_proxy``: the :class:`Proxy` factory and its configuration;
- ``_backends``: the backends, choosing one (balancing) and passive health;
- ``_health``: active health checks (:class:`HealthCheck`);
- ``_relay``: the Twisted relay (:class:`Relay`), its idle and close timers;
- ``_splice``: the Linux ``splice(2)`` relay for plain TCP;
- ``_tls``: TLS to backends.
"""

from muxtwist.proxy._backends import BALANCE, Backend, BackendStats
from muxtwist.proxy._health import HealthCheck
from muxtwist.proxy._proxy import Proxy
from muxtwist.proxy._relay import Relay

__all__ = ["BALANCE", "Backend", "BackendStats", "HealthCheck", "Proxy"]

for _public in (Backend, BackendStats, HealthCheck, Proxy, Relay):
    # Named where they are imported from, as before the package was split:
    # the API reference documents each once, under that name.
    _public.__module__ = __name__
del _public
