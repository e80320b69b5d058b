"""Seed statistics: mean ± std, and paired t-intervals of a method's difference from the baseline.

Definitions:

- *paired difference*: a number computed from a method's run and the baseline's run with the same model and
  seed (speed-up, final-loss difference, loss ratio), so that what the seed changes (initial weights, data
  order) cancels out;
- *interval*: the two-sided t-interval ``mean ± t(1 - (1 - confidence) / 2, n - 1) * std / sqrt(n)`` over the
  ``n`` seeds' paired differences (sample std), which assumes they are independent and roughly normal;
- *distinguishable*: the interval excludes the null value (0 for a difference, 1 for a ratio);
- with fewer than :data:`MIN_SEEDS` (3) seeds no claim is made: with 2 a t-interval exists but has one degree
  of freedom (``t = 12.7`` at 95%), so wide that it says nothing.

The t quantiles come from ``scipy.stats.t`` when scipy is installed; without it, from a table of the 95%
quantiles for ``n - 1`` = 1..30 and the normal quantile (1.96) beyond, which is then slightly too narrow
(1.96 instead of 2.04 at 30 degrees of freedom); other confidence levels then need scipy.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

MIN_SEEDS = 3
# t(0.975, df) for df = 1..30, and the normal quantile beyond.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z975 = 1.960


def _present(values: Sequence[Optional[float]]) -> list:
    return [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def mean_std(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    """``{"mean", "std", "n"}`` over the values that are not ``None``/NaN; ``std`` needs two."""
    xs = _present(values)
    n = len(xs)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (scipy, else the 0.975 table)."""
    try:
        from scipy.stats import t
    except ImportError:
        if abs(p - 0.975) > 1e-12:
            raise ValueError(f"the t quantile {p} needs scipy (pip install scipy); without it only 0.975 is known")
        return T975[df - 1] if df <= len(T975) else Z975
    return float(t.ppf(p, df))


def paired_interval(diffs: Sequence[Optional[float]], confidence: float = 0.95, null: float = 0.0) -> dict:
    """The t-interval of the mean paired difference over seeds (``None``/NaN entries left out).

    ``{"mean", "std", "n", "confidence", "null", "low", "high", "distinguishable"}``; ``distinguishable`` is whether
    ``[low, high]`` excludes ``null``. With fewer than :data:`MIN_SEEDS` values ``low``, ``high`` and
    ``distinguishable`` are ``None`` and ``note`` says why.
    """
    out = {**mean_std(diffs), "confidence": confidence, "null": null}
    if out["n"] < MIN_SEEDS:
        return {**out, "low": None, "high": None, "distinguishable": None,
                "note": f"fewer than {MIN_SEEDS} seeds: no claim can be made"}
    half = t_quantile(1.0 - (1.0 - confidence) / 2.0, out["n"] - 1) * out["std"] / math.sqrt(out["n"])
    low, high = out["mean"] - half, out["mean"] + half
    return {**out, "low": low, "high": high, "distinguishable": not low <= null <= high}


def format_interval(ci: Optional[dict], fmt: str = "{:+.4f}", pct: bool = False, label: bool = False) -> str:
    """``mean [low, high]`` (``mean [95% CI low, high]`` with ``label``; ``mean`` alone below
    :data:`MIN_SEEDS` seeds, ``–`` with none)."""
    if not ci or ci.get("mean") is None:
        return "–"
    k, unit = (100.0, "%") if pct else (1.0, "")
    text = fmt.format(k * ci["mean"]) + unit
    if ci.get("low") is not None:
        prefix = f"{ci['confidence']:.0%} CI " if label else ""
        text += f" [{prefix}{fmt.format(k * ci['low'])}{unit}, {fmt.format(k * ci['high'])}{unit}]"
    return text


def verdict(ci: dict) -> str:
    """``distinguishable from zero`` / ``not distinguishable from zero at n=N`` (``one`` for a ratio) / the note."""
    if ci.get("distinguishable") is None:
        return ci["note"]
    null = {0.0: "zero", 1.0: "one"}.get(ci["null"], f"{ci['null']:g}")
    if ci["distinguishable"]:
        return f"distinguishable from {null}"
    return f"not distinguishable from {null} at n={ci['n']}"
