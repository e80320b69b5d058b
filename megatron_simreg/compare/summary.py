"""Per-run numbers and their mean ± std over seeds: what ``results.json`` holds and ``report.md`` shows.

Definitions:

- *target*: the final validation loss of the baseline run with the same model and seed;
- *tokens-to-target*: the tokens at which a run's validation loss first reaches the target, linearly
  interpolated between the two evaluations that bracket the crossing
  (:func:`~megatron_simreg.analysis.convergence.tokens_to_target`); the baseline's own is where it
  first reaches its final loss (its last evaluation, unless the curve dipped below it earlier);
- *speed-up*: ``1 - tokens_method / tokens_baseline``, paired by seed. A run that never reaches the
  target has no speed-up; the summary says in how many seeds it was reached and averages over those;
- mean ± std over seeds uses the sample standard deviation (``n - 1``); with one seed there is no std.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

from ..analysis.convergence import speedup, tokens_to_target
from .grid import Grid

ANALYSIS_SCALARS = ("intra_cos", "inter_cos", "margin_mean", "margin_median", "margin_frac_positive",
                    "jump_strength")


def mean_std(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    """``{"mean", "std", "n"}`` over the values that are not ``None``/NaN; ``std`` needs two."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(xs)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def per_run(grid: Grid, evals: Dict[str, dict]) -> Dict[str, dict]:
    """``{run name: numbers}`` for every evaluated run (runs whose baseline is not evaluated lack the speed-up)."""
    out = {}
    for run in grid.runs:
        ev = evals.get(run.name)
        if ev is None or not ev["val_loss"]:
            continue
        base = evals.get(grid.run(run.model, "baseline", run.seed).name)
        row = {"model": run.model, "method": run.method, "seed": run.seed, "iteration": ev["iteration"],
               "tokens": ev["tokens"], "val_loss": ev["val_loss"], "final_val_loss": ev["val_loss"][-1]}
        if base is not None and base["val_loss"]:
            target = base["val_loss"][-1]
            t_base = tokens_to_target(base["tokens"], base["val_loss"], target)
            t_run = tokens_to_target(ev["tokens"], ev["val_loss"], target)
            row.update(target=target, tokens_to_target=t_run, baseline_tokens_to_target=t_base,
                       speedup=speedup(t_run, t_base))
        if "zero_shot" in ev:
            row["zero_shot"] = {task: r["value"] for task, r in ev["zero_shot"].items()}
            row["zero_shot_avg"] = sum(row["zero_shot"].values()) / len(row["zero_shot"])
        if "analysis" in ev:
            row["analysis"] = ev["analysis"]
        out[run.name] = row
    return out


def summarize(grid: Grid, runs: Dict[str, dict]) -> Dict[str, Dict[str, dict]]:
    """``{model: {method: aggregate}}`` over the seeds that have results."""
    summary: Dict[str, Dict[str, dict]] = {}
    for model in grid.models:
        for method in grid.methods:
            rows = [runs[r.name] for r in grid.runs if (r.model, r.method) == (model, method) and r.name in runs]
            if not rows:
                continue
            agg = {"seeds": [r["seed"] for r in rows], "final_val_loss": mean_std([r["final_val_loss"] for r in rows])}
            if all("speedup" in r for r in rows):
                agg["tokens_to_target"] = mean_std([r["tokens_to_target"] for r in rows])
                agg["speedup"] = mean_std([r["speedup"] for r in rows])
                agg["reached"] = sum(r["tokens_to_target"] is not None for r in rows)
            if all("zero_shot" in r for r in rows):
                tasks = list(rows[0]["zero_shot"])
                agg["zero_shot"] = {t: mean_std([r["zero_shot"][t] for r in rows]) for t in tasks}
                agg["zero_shot_avg"] = mean_std([r["zero_shot_avg"] for r in rows])
            if all("analysis" in r for r in rows):
                agg["analysis"] = _analysis(rows)
            agg["curve"] = _mean_curve(rows)
            summary.setdefault(model, {})[method] = agg
    return summary


def _analysis(rows: List[dict]) -> dict:
    an = [r["analysis"] for r in rows]
    out = {k: mean_std([a.get(k) for a in an]) for k in ANALYSIS_SCALARS}
    out["inter_intra_gap"] = mean_std([None if a.get("intra_cos") is None or a.get("inter_cos") is None
                                       else a["intra_cos"] - a["inter_cos"] for a in an])
    layers = [a["layer_distances"] for a in an]
    out["layer_distances"] = [mean_std([d[i] for d in layers]) for i in range(len(layers[0]))]
    hists = [a["margin_hist"] for a in an]
    out["margin_hist"] = {"edges": hists[0]["edges"],
                          "counts": [sum(h["counts"][i] for h in hists) for i in range(len(hists[0]["counts"]))]}
    return out


def _mean_curve(rows: List[dict]) -> dict:
    """The mean and std of the validation curves when the seeds evaluated at the same tokens, else the first seed's."""
    tokens = rows[0]["tokens"]
    if any(r["tokens"] != tokens for r in rows):
        return {"tokens": tokens, "mean": rows[0]["val_loss"], "std": None}
    points = [mean_std([r["val_loss"][i] for r in rows]) for i in range(len(tokens))]
    return {"tokens": tokens, "mean": [p["mean"] for p in points],
            "std": [p["std"] for p in points] if len(rows) > 1 else None}
