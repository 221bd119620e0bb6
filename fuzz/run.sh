#!/usr/bin/env bash
# Run every atheris harness for a bounded time.
#
#   fuzz/run.sh [SECONDS] [NAME ...]
#
# SECONDS is the time per harness (default: FUZZ_SECONDS, else 20; .ci/run
# runs 3, a smoke run); NAMEs pick harnesses (default: all). Other options go
# to run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
    seconds="$1"
    shift
    exec python3 fuzz/run.py --seconds "$seconds" "$@"
fi
exec python3 fuzz/run.py "$@"
