"""``python -m muxtwist check|explain``: see :mod:`muxtwist.cli`."""

from __future__ import annotations

import sys

from muxtwist.cli import main

if __name__ == "__main__":
    sys.exit(main())
