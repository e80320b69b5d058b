"""Convergence comparisons: tokens-to-target and the speed-up of a method over a baseline."""

from __future__ import annotations

import json
from typing import List, Optional, Sequence, Tuple


def read_metrics(path: str) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluations(records: Sequence[dict]) -> List[dict]:
    """The records that carry an evaluation, in order (the last record wins per iteration)."""
    by_iter = {r["iteration"]: r for r in records if "val_loss" in r}
    return [by_iter[i] for i in sorted(by_iter)]


def validation_curve(records: Sequence[dict]) -> Tuple[List[float], List[float]]:
    """``(consumed_tokens, val_loss)`` of the evaluations, in order (last record wins per iteration)."""
    points = evaluations(records)
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


def smooth(losses: Sequence[float], window: int = 3) -> List[float]:
    """Centered moving average over ``window`` (odd) evaluations; at the ends, over the neighbours there are.

    With ``window=3``: ``(l[i-1] + l[i] + l[i+1]) / 3`` inside, ``(l[0] + l[1]) / 2`` and
    ``(l[-2] + l[-1]) / 2`` at the ends. One noisy evaluation moves each smoothed point by at most a third
    of its error (half at an end), where a running minimum would keep a noise dip for the rest of the curve.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"the window must be a positive odd number of evaluations, not {window}")
    h = window // 2
    out = []
    for i in range(len(losses)):
        near = losses[max(0, i - h):i + h + 1]
        out.append(sum(near) / len(near))
    return out


def loss_at(tokens: Sequence[float], losses: Sequence[float], at: float) -> Optional[float]:
    """The loss at ``at`` tokens, linearly interpolated between the evaluations that bracket it.

    ``None`` outside the evaluated range (no extrapolation).
    """
    for (t0, l0), (t1, l1) in zip(zip(tokens, losses), zip(tokens[1:], losses[1:])):
        if t0 <= at <= t1:
            return float(l0 if t1 == t0 else l0 + (l1 - l0) * (at - t0) / (t1 - t0))
    return float(losses[0]) if len(tokens) == 1 and tokens[0] == at else None


def speedup(tokens_method: Optional[float], tokens_baseline: Optional[float]) -> Optional[float]:
    """``1 - tokens_method / tokens_baseline``: the paper's "convergence acceleration".

    ``None`` when either side never reached the target, or the baseline reached it at 0 tokens
    (no ratio to take): there is no speed-up to report, rather than a division by zero.
    """
    if tokens_method is None or tokens_baseline is None or tokens_baseline <= 0:
        return None
    return 1.0 - tokens_method / tokens_baseline
