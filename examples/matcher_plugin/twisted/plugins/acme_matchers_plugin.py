"""
Registers the ``memcached`` matcher, so that
``muxtwist.matchers.plugin("memcached")`` finds it.

This module lives in a ``twisted/plugins/`` directory (with no
``__init__.py``) that is on ``sys.path``: next to your package in your
source tree, and shipped in your wheel the same way.
"""

from acme_matchers import Memcached

from muxtwist.matchers import MatcherPlugin

memcached = MatcherPlugin("memcached", Memcached, "the memcached text protocol")
