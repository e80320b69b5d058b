"""What the trainer tests share: a tiny GPT's flags, and ``megatron-simreg train`` run as a subprocess.

Each run is a subprocess (the trainer owns torch.distributed and Megatron's
global parallel state), on a tiny GPT over the cached stdlib corpus.
"""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
        "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--swiglu",
        "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "1"]
REG = ["--simreg-weight", "0.1", "--jreg-weight", "1.0"]


# Layout comparisons train for real from the first step (TINY's warmup 1 trains iteration 1 at lr 0): 4 updates,
# the last 3 losses and grad norms each computed after one more update, so 3 updates are checked
REAL = ["--lr-warmup-iters", "0", "--train-iters", "4"]
KEYS = ("lm_loss", "simreg_loss", "jreg_loss", "grad_norm")


def train(*flags, cache, env=None, expect_ok=True, timeout=400, shim=None):
    """``megatron-simreg train`` with TINY and ``flags``; ``shim``: a script under tests/shims/ that runs the CLI."""
    entry = [os.path.join(ROOT, "tests", "shims", shim)] if shim else ["-m", "megatron_simreg.cli"]
    cmd = [sys.executable, *entry, "train", *TINY, "--data-cache-path", cache, *flags]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if expect_ok:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def metrics(save):
    return [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]


def losses(save):
    return [round(r["lm_loss"], 6) for r in metrics(save)]


_REFERENCES = {}


def reference(*flags, cache):
    """A run's save directory, trained once per pytest session for these flags (reference runs several tests share)."""
    key = tuple(flags)
    if key not in _REFERENCES:
        save = tempfile.mkdtemp(prefix="simreg-reference-")
        atexit.register(shutil.rmtree, save, True)
        train("--save", save, *flags, cache=cache)
        _REFERENCES[key] = save
    return _REFERENCES[key]


# grad_norm is a float64 sum of squares (cpu_compat adaptation 6) that another layout cuts and adds in another order.
# An fp32 gradient's square is exact in float64 (48 of 53 bits); a sum of n non-negative terms is within
# (n - 1) * 2**-53 relative of the exact one in any order, so two orders differ by < 2n * 2**-53 and their square
# roots by < n * 2**-53: 1.8e-11 for the dense tiny GPT's n = 1.6e5 parameters, 5.6e-11 for up to 5e5 (MoE).
# Measured: <= 2.6e-15 (DP=2 with the distributed optimizer, fp32 and bf16).
F64_SUM = 1e-10


def assert_same_training(ref_save, other_save, tol, keys=KEYS):
    """``other_save`` trained like ``ref_save``: per iteration (at least 4, all at lr > 0, zip strict) the LM loss,
    the regularizer values and the pre-clip grad norm agree to relative ``tol`` (0: bitwise; grad_norm to F64_SUM).

    The iterations are checked in order, and each one's keys in ``keys``' order (losses before grad_norm): the
    first difference is the one reported."""
    a, b = metrics(ref_save), metrics(other_save)
    assert len(a) >= 4 and all(r["lr"] > 0 for r in a + b), "needs at least 3 real updates checked (warmup 0)"
    for ra, rb in zip(a, b, strict=True):
        assert ra["iteration"] == rb["iteration"], (ra, rb)
        for key in keys:
            t = max(tol, F64_SUM) if key == "grad_norm" else tol
            diff = abs(ra[key] - rb[key])
            assert diff <= t * abs(ra[key]), (
                f"iteration {ra['iteration']} {key}: {ra[key]!r} vs {rb[key]!r}, "
                f"relative difference {diff / abs(ra[key]):.3g} > {t:g}")


def assert_same_run(full, part, keys=("lm_loss", "simreg_loss", "jreg_loss", "lr", "val_loss"), rel=1e-5):
    """A resumed run ``part`` logged the iterations of the uninterrupted ``full`` with the same ``keys`` (relative
    ``rel``, absolute below 1; 0: bitwise)."""
    a, b = metrics(full), metrics(part)
    assert [r["iteration"] for r in b] == [r["iteration"] for r in a]
    for ra, rb in zip(a, b, strict=True):
        for key in keys:
            if key in ra:
                assert abs(ra[key] - rb[key]) <= rel * max(1.0, abs(ra[key])), (key, ra, rb)
