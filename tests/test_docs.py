"""
The documentation builds nitpicky with no warning, links Twisted's and
Python's own docs through the inventories kept in docs/_inventories, shows
interfaces by name, and has no link to an anchor that does not exist.

Slow (a full Sphinx build, about 40 s).
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from urllib.parse import unquote, urldefrag

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def broken_anchors(root: str) -> list[tuple[str, str]]:
    """(page, href) for each link from one built page to an id another built page does not have."""
    ids: dict[str, set[str]] = {}
    pages: list[tuple[str, str]] = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".html"):
                path = os.path.normpath(os.path.join(folder, name))
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                ids[path] = set(re.findall(r'\bid="([^"]+)"', text))
                pages.append((path, text))
    broken = []
    for path, text in pages:
        for href in re.findall(r'\bhref="([^"]+)"', text):
            href = html.unescape(href)
            if "#" not in href or re.match(r"[a-z]+:", href):
                continue
            target, anchor = urldefrag(href)
            page = os.path.normpath(os.path.join(os.path.dirname(path), unquote(target))) if target else path
            if anchor and page in ids and unquote(anchor) not in ids[page]:
                broken.append((os.path.relpath(path, root), href))
    return broken


class DocsBuildTests(unittest.TestCase):
    def test_nitpicky_build(self) -> None:
        """sphinx -n -W builds the docs; types link to Twisted and Python; every in-site anchor exists."""
        out = os.path.abspath(self.mktemp())
        done = subprocess.run(
            [sys.executable, "-m", "sphinx", "-n", "-W", "--keep-going", "-q", "-b", "html", "docs", out],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        with open(os.path.join(out, "reference", "api.html"), encoding="utf-8") as f:
            api = f.read()
        self.assertNotIn("InterfaceClass", api)
        self.assertIn('href="https://docs.twisted.org/en/stable/api/twisted.internet.interfaces.IAddress.html"', api)
        self.assertIn("https://docs.python.org/3/library/", api)
        self.assertEqual(broken_anchors(out), [])
