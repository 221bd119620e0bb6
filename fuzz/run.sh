#!/usr/bin/env bash
# Run every atheris harness for a bounded time (FUZZ_SECONDS, default 20 s each).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 fuzz/run.py "$@"
