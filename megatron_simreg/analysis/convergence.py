"""Convergence comparisons: tokens-to-target and the speed-up of a method over a baseline."""

from __future__ import annotations

import json
from typing import List, Optional, Sequence, Tuple


def read_metrics(path: str) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def validation_curve(records: Sequence[dict]) -> Tuple[List[float], List[float]]:
    """``(consumed_tokens, val_loss)`` of the evaluations, in order (last record wins per iteration)."""
    by_iter = {r["iteration"]: r for r in records if "val_loss" in r}
    points = [by_iter[i] for i in sorted(by_iter)]
    return [p["consumed_tokens"] for p in points], [p["val_loss"] for p in points]


def tokens_to_target(tokens: Sequence[float], losses: Sequence[float], target: float) -> Optional[float]:
    """Tokens at which the validation loss first reaches ``target``.

    Linear interpolation between the two evaluations that bracket the first
    crossing (loss is treated as linear in tokens between evaluations).
    ``None`` when the curve never reaches the target.
    """
    prev_t, prev_l = None, None
    for t, l in zip(tokens, losses):
        if l <= target:
            if prev_t is None or prev_l == l:
                return float(t)
            return float(prev_t + (t - prev_t) * (prev_l - target) / (prev_l - l))
        prev_t, prev_l = t, l
    return None


def speedup(tokens_method: Optional[float], tokens_baseline: Optional[float]) -> Optional[float]:
    """``1 - tokens_method / tokens_baseline``: the paper's "convergence acceleration".

    ``None`` when either side never reached the target, or the baseline reached it at 0 tokens
    (no ratio to take): there is no speed-up to report, rather than a division by zero.
    """
    if tokens_method is None or tokens_baseline is None or tokens_baseline <= 0:
        return None
    return 1.0 - tokens_method / tokens_baseline
