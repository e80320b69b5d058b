"""What the trainer tests share: a tiny GPT's flags, and ``megatron-simreg train`` run as a subprocess.

Each run is a subprocess (the trainer owns torch.distributed and Megatron's
global parallel state), on a tiny GPT over the cached stdlib corpus.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
        "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--swiglu",
        "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "1"]
REG = ["--simreg-weight", "0.1", "--jreg-weight", "1.0"]


def train(*flags, cache, env=None, expect_ok=True, timeout=400):
    cmd = [sys.executable, "-m", "megatron_simreg.cli", "train", *TINY, "--data-cache-path", cache, *flags]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if expect_ok:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def metrics(save):
    return [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]


def losses(save):
    return [round(r["lm_loss"], 6) for r in metrics(save)]
