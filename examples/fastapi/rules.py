"""
FastAPI, SSH and Redis on one port: the web application served in-process
(no second hop), SSH and Redis relayed to their servers::

    pip install '.[asgi]' fastapi    # from a checkout of muxtwist
    SSHD_PORT=22 REDIS_PORT=6379 \\
        twistd -n --reactor=asyncio muxtwist --port 3000 --config examples/fastapi/rules.py
    curl http://127.0.0.1:3000/hello/you
    ssh -p 3000 you@127.0.0.1
    redis-cli -p 3000 PING

ASGI applications run on Twisted's asyncio reactor: ``--reactor=asyncio``
goes before ``muxtwist``.
"""

import os

from webapp import app

from muxtwist import Rule
from muxtwist.actions import Proxy
from muxtwist.apps import ASGI
from muxtwist.matchers import HTTP1, SSH, Redis

ssh = Proxy(f"tcp:host=127.0.0.1:port={int(os.environ.get('SSHD_PORT', '22'))}")

rules = [
    Rule(HTTP1(), ASGI(app), name="web"),
    Rule(SSH(), ssh, name="ssh"),
    Rule(Redis(), Proxy(f"tcp:host=127.0.0.1:port={int(os.environ.get('REDIS_PORT', '6379'))}"), name="redis"),
]

# Some SSH clients (ssh-keyscan among them) wait for the server to speak first.
on_timeout = ssh
sniff_timeout = 1.0
