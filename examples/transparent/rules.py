"""
SSH and HTTPS on port 443, with sshd and the web server seeing each client's
own address although neither reads the PROXY protocol.

Run as root (or with CAP_NET_RAW) after ``python -m muxtwist doctor`` says
the host is ready:

    python -m muxtwist doctor examples/transparent/rules.py
    twistd -n muxtwist --port 443 --config examples/transparent/rules.py

The backends' addresses come from the environment so the test suite can run
this very file between network namespaces of its own.
"""

import os

from muxtwist import Rule
from muxtwist.actions import Proxy
from muxtwist.matchers import HTTP1, SSH, TLS

SSH_BACKEND = os.environ.get("SSH_BACKEND", "tcp:host=10.0.0.2:port=22")
WEB_BACKEND = os.environ.get("WEB_BACKEND", "tcp:host=10.0.0.3:port=443")
HTTP_BACKEND = os.environ.get("HTTP_BACKEND", "tcp:host=10.0.0.3:port=80")

ssh = Proxy(SSH_BACKEND, transparent=True)

rules = [
    Rule(SSH(), ssh, name="ssh"),
    Rule(TLS(), Proxy(WEB_BACKEND, transparent=True), name="https"),
    Rule(HTTP1(), Proxy(HTTP_BACKEND, transparent=True), name="http"),
]
# ssh-keyscan and some SSH clients wait for the server to speak first.
on_timeout = ssh
sniff_timeout = 1.0
