#!/usr/bin/env bash
# Create or reuse the project-local virtualenv .venv and install what the
# project needs. Sourced by tools/demo.sh and tools/test.sh; safe to re-run
# (a stamp file skips pip when nothing changed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY_BOOT="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  # --system-site-packages keeps a torch the machine already has (e.g. a
  # cluster image's CUDA build) instead of downloading another one.
  "$PY_BOOT" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
STAMP="$VENV/.megatron-simreg-setup"
WANT="$(cat "$ROOT/setup.py" "$ROOT/tools/setup_env.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  return 0 2>/dev/null || exit 0
fi

PIP=("$PY" -m pip install --disable-pip-version-check -q)
PYVER="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case "$PYVER" in
  3.10|3.11) MCORE="megatron-core==0.16.1" ;;   # 0.17+ needs Python >= 3.12
  3.12) MCORE="megatron-core>=0.16.1,<0.20" ;;
  *) echo "error: Python $PYVER is not supported; use Python 3.10-3.12 (PYTHON=python3.12 bash $0)" >&2; exit 1 ;;
esac

# Keep an existing torch; otherwise take the CPU build (a bare `torch`
# requirement would pull a multi-GB CUDA build).
if ! "$PY" -c 'import torch' 2>/dev/null; then
  "${PIP[@]}" "torch==2.13.0"
fi
# Never `pip install apex`: the PyPI package of that name is an unrelated web
# toolkit. NVIDIA apex is optional and detected at run time.
"${PIP[@]}" "$MCORE" sentencepiece transformers safetensors pyyaml pytest pytest-timeout tqdm matplotlib tensorboard wandb lm-eval accelerate datasketch scipy pytest-xdist
"$PY" -c 'import triton' 2>/dev/null || "${PIP[@]}" "triton>=3.2,<4"  # impl="triton"; CPU tests use its interpreter
"${PIP[@]}" --no-build-isolation "deepspeed>=0.19,<0.20"
"${PIP[@]}" --no-build-isolation --no-deps -e "$ROOT"
echo "$WANT" > "$STAMP"
