#!/usr/bin/env bash
# The test suite: set up .venv if needed, then run pytest (extra args pass through).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/setup_env.sh"
cd "$ROOT"
# Two workers by default, each running one test file at a time (module fixtures are built once per file);
# PYTEST_WORKERS=0 runs serially.
WORKERS="${PYTEST_WORKERS:-2}"
XDIST=()
if [ "$WORKERS" != "0" ]; then
  XDIST=(-n "$WORKERS" --dist loadfile)
fi
exec "$ROOT/.venv/bin/python" -m pytest "${XDIST[@]}" "$@"
