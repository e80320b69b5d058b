#!/usr/bin/env bash
# The test suite: set up .venv if needed, then run pytest (extra args pass through).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/setup_env.sh"
cd "$ROOT"
# Three workers by default on 2 cores, each running one test file at a time (module fixtures are built once per
# file): most tests wait on subprocesses and gloo, and with two workers the cores were busy 1.3 of 2 on average
# (27 min with three against 33-39 min with two, 2026-12-07). PYTEST_WORKERS=0 runs serially.
WORKERS="${PYTEST_WORKERS:-3}"
XDIST=()
if [ "$WORKERS" != "0" ]; then
  XDIST=(-n "$WORKERS" --dist loadfile)
fi
exec "$ROOT/.venv/bin/python" -m pytest "${XDIST[@]}" "$@"
