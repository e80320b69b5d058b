#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the CPU demo.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/setup_env.sh"
exec "$ROOT/.venv/bin/megatron-simreg" demo "$@"
