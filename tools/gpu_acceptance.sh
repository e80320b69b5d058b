#!/usr/bin/env bash
# One-command acceptance run of the GPU path (bf16, distributed optimizer, TransformerEngine when importable):
# prints PASS/FAIL per check, exits non-zero on any FAIL. See tools/gpu_acceptance.py for the checks.
#   bash tools/gpu_acceptance.sh [--out DIR]        # on one H100/H200, a few minutes
#   bash tools/gpu_acceptance.sh --cpu-smoke        # tiny model on CPU: only proves the script runs
#   bash tools/gpu_acceptance.sh --only 2 [--only 4] [--reference OUT/train]   # some checks (2-4 need run 1)
# Each check is shown to fail on a planted bug of its kind: tests/test_gpu_acceptance.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/setup_env.sh"
cd "$ROOT"
"$ROOT/.venv/bin/python" -m megatron_simreg.cli env || true
exec "$ROOT/.venv/bin/python" tools/gpu_acceptance.py "$@"
