"""Per-run numbers and their mean ± std over seeds: what ``results.json`` holds and ``report.md`` shows.

Definitions:

- *smoothed curve*: a validation curve averaged over 3 consecutive evaluations, centered (the first and last
  evaluations over the 2 there are; :func:`~megatron_simreg.analysis.convergence.smooth`), so that one noisy
  evaluation cannot decide where a curve crosses the target. Not a running minimum, which keeps every noise dip;
- *target*: the smoothed final validation loss of the baseline run with the same model and seed;
- *tuned baseline*: where the grid sweeps the baseline, the variant with the lowest mean final validation loss
  over the seeds that every variant finished (per model); "the baseline" is then that variant, every method is
  paired with it, and picking the best of several is, if anything, in the baseline's favour;
- *tokens-to-target*: the tokens at which a run's smoothed curve first reaches the target, linearly
  interpolated between the two evaluations that bracket the crossing
  (:func:`~megatron_simreg.analysis.convergence.tokens_to_target`); the baseline's own is where its smoothed
  curve first reaches its smoothed final loss (its last evaluation, unless the curve dipped below it earlier);
- *speed-up*: ``1 - tokens_method / tokens_baseline``, paired by seed. A run that never reaches the
  target has no speed-up; the summary says in how many seeds it was reached and averages over those;
- *final-loss difference*: the method's final validation loss minus the same seed's baseline's (last
  evaluations, not smoothed); negative means the method ends lower;
- *validation noise of the difference* (``final_loss_diff_se``): the standard error of the final-loss difference
  that comes from evaluating on a finite validation sample. Runs with the same seed and data evaluate the same
  batches, so it is the spread of the per-batch differences (method minus baseline, from the trainer's
  ``val_batches``) over ``sqrt(batches)``; averaged over seeds. Much smaller than either run's own SE,
  because most of a batch's difficulty is shared; when it is small next to the final-loss difference's interval,
  the interval's width is seed-to-seed training noise, which only more seeds reduce. "not measured" where a run
  did not record its batches or the two did not evaluate the same ones (the trainer records their tokens' hash);
- *loss ratio at equal tokens*: the method's validation loss at the tokens of the baseline's final evaluation
  (linearly interpolated if the method was not evaluated there) over the baseline's final validation loss, same
  seed; below 1 means the method is lower at the same budget;
- *final val loss SE*: the standard error of a run's final validation loss over its evaluation batches, where
  the trainer recorded one (``val_loss_se``), averaged over seeds; set it against the std over seeds to see how
  much of the seed-to-seed spread is evaluation noise. "not measured" where no evaluation recorded it;
- *effective compute multiplier* (grids with ``compute-multipliers``): the multiple of the budget at which a
  baseline trained with its own full schedule would end at the method's final validation loss. Per seed, the
  baseline's final validation losses at multipliers 1 (the baseline run) and each budget baseline's (same seed,
  in increasing multiplier) are interpolated linearly, multiplier against final loss, between the first two
  consecutive budgets whose losses bracket the method's (the loss should fall with the budget; where it does not,
  the first bracketing pair decides). A method's loss above every budget's has none ("worse than the baseline at
  equal budget"), below every budget's none either ("beyond the largest budget"); the mean and interval (null
  1: equal compute) are over the seeds that have one. Against a baseline whose cosine schedule ends at the
  budget, tokens-to-target flatters a method (the baseline only reaches its final loss while annealing); this
  figure does not;
- mean ± std over seeds uses the sample standard deviation (``n - 1``); with one seed there is no std.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

from ..analysis.convergence import loss_at, smooth, speedup, tokens_to_target
from .grid import Grid
from .statistics import MIN_SEEDS, format_interval, mean_std, paired_interval, verdict

ANALYSIS_SCALARS = ("intra_cos", "inter_cos", "margin_mean", "margin_median", "margin_frac_positive",
                    "jump_strength")


def per_run(grid: Grid, evals: Dict[str, dict]) -> Dict[str, dict]:
    """``{run name: numbers}`` for every evaluated run (runs whose baseline is not evaluated lack the speed-up)."""
    out = {}
    finals = {name: ev["val_loss"][-1] for name, ev in evals.items() if ev["val_loss"]}
    tuned = tuned_baselines(grid, finals)
    for run in grid.runs:
        ev = evals.get(run.name)
        if ev is None or not ev["val_loss"]:
            continue
        base = evals.get(grid.run(run.model, tuned[run.model], run.seed).name) if run.model in tuned else None
        se = ev.get("val_loss_se")
        row = {"model": run.model, "method": run.method, "seed": run.seed, "iteration": ev["iteration"],
               "tokens": ev["tokens"], "val_loss": ev["val_loss"], "final_val_loss": ev["val_loss"][-1],
               "final_val_loss_se": se[-1] if se else None}
        if base is not None and base["val_loss"]:
            row.update(paired(ev, base), baseline=tuned[run.model])
            if grid.budget_baselines and run.method not in grid.baselines and run.method in grid.methods:
                row.update(compute_multiplier(budget_points(grid, finals, run.model, run.seed), row["final_val_loss"]))
        if "zero_shot" in ev:
            row["zero_shot"] = {task: r["value"] for task, r in ev["zero_shot"].items()}
            row["zero_shot_avg"] = sum(row["zero_shot"].values()) / len(row["zero_shot"])
        if "analysis" in ev:
            row["analysis"] = ev["analysis"]
        out[run.name] = row
    return out


def paired(ev: dict, base: dict) -> dict:
    """A run's numbers against the baseline run with the same model and seed (see the Definitions)."""
    run_smooth, base_smooth = smooth(ev["val_loss"]), smooth(base["val_loss"])
    target = base_smooth[-1]
    t_base = tokens_to_target(base["tokens"], base_smooth, target)
    t_run = tokens_to_target(ev["tokens"], run_smooth, target)
    at_base_end = loss_at(ev["tokens"], ev["val_loss"], base["tokens"][-1])
    return {"target": target, "tokens_to_target": t_run, "baseline_tokens_to_target": t_base,
            "speedup": speedup(t_run, t_base), "final_loss_diff": ev["val_loss"][-1] - base["val_loss"][-1],
            "final_loss_diff_se": difference_se(ev.get("final_val_batches"), base.get("final_val_batches")),
            "loss_ratio_at_equal_tokens": None if at_base_end is None else at_base_end / base["val_loss"][-1]}


def difference_se(run: Optional[dict], base: Optional[dict]) -> Optional[float]:
    """The standard error of the mean of the per-batch differences ``run - base`` from two runs' final
    evaluations (the trainer's ``val_batches``: ``{"losses": [per batch], "sha256": of their tokens}``);
    ``None`` unless both evaluated the same batches (equal fingerprints), at least two."""
    if not run or not base or run["sha256"] != base["sha256"] or len(run["losses"]) < 2:
        return None
    diffs = [r - b for r, b in zip(run["losses"], base["losses"])]
    return mean_std(diffs)["std"] / math.sqrt(len(diffs))


def budget_points(grid: Grid, finals: Dict[str, float], model: str, seed: int) -> List[Tuple[float, float]]:
    """``[(multiplier, final val loss)]`` of the baseline (1.0) and each budget baseline of ``model`` and ``seed``,
    in increasing multiplier, from ``{run name: final val loss}``; empty when one of them has not finished."""
    names = {1.0: "baseline", **{m: name for name, m in grid.budget_baselines.items()}}
    points = [(m, finals.get(grid.run(model, name, seed).name)) for m, name in sorted(names.items())]
    return points if all(loss is not None for _, loss in points) else []


def compute_multiplier(points: Sequence[Tuple[float, float]], loss: float) -> dict:
    """``{"compute_multiplier": m or None, "compute_multiplier_note": None or why not}`` for a run ending at
    ``loss``, from :func:`budget_points` (see the Definitions)."""
    if not points:
        return {"compute_multiplier": None, "compute_multiplier_note": "budget baselines unfinished"}
    for (m0, l0), (m1, l1) in zip(points, points[1:]):
        if min(l0, l1) <= loss <= max(l0, l1):
            m = m0 if l0 == l1 else m0 + (m1 - m0) * (l0 - loss) / (l0 - l1)
            return {"compute_multiplier": m, "compute_multiplier_note": None}
    note = ("worse than the baseline at equal budget" if loss > points[0][1]
            else f"beyond the largest budget (> {points[-1][0]:g}x)")
    return {"compute_multiplier": None, "compute_multiplier_note": note}


def tuned_baselines(grid: Grid, final_losses: Dict[str, float]) -> Dict[str, str]:
    """``{model: the tuned baseline's method name}`` from ``{run name: final val loss}`` (see the Definitions);
    models without a finished baseline run are left out."""
    tuned = {}
    for model in grid.models:
        finals = {m: {s: final_losses.get(grid.run(model, m, s).name) for s in grid.seeds} for m in grid.baselines}
        common = [s for s in grid.seeds if all(f[s] is not None for f in finals.values())]
        means = {m: _mean_over(f, common) for m, f in finals.items()}
        means = {m: v for m, v in means.items() if v is not None}
        if means:
            tuned[model] = min(means, key=means.get)
    return tuned


def _mean_over(finals: Dict[int, Optional[float]], seeds: List[int]) -> Optional[float]:
    """The mean over ``seeds``, or over the seeds that have a value when ``seeds`` is empty."""
    values = [finals[s] for s in seeds] if seeds else [v for v in finals.values() if v is not None]
    return sum(values) / len(values) if values else None


def summarize(grid: Grid, runs: Dict[str, dict]) -> Dict[str, Dict[str, dict]]:
    """``{model: {method: aggregate}}`` over the seeds that have results; ``baseline`` names the (tuned)
    baseline each aggregate is measured against, ``sweep`` a swept method's origin and values."""
    summary: Dict[str, Dict[str, dict]] = {}
    tuned = tuned_baselines(grid, {name: r["final_val_loss"] for name, r in runs.items()})
    for model in grid.models:
        for method in grid.methods:
            rows = [runs[r.name] for r in grid.runs if (r.model, r.method) == (model, method) and r.name in runs]
            if not rows:
                continue
            agg = {"seeds": [r["seed"] for r in rows], "baseline": tuned.get(model),
                   "final_val_loss": mean_std([r["final_val_loss"] for r in rows]),
                   "final_val_loss_se": mean_std([r["final_val_loss_se"] for r in rows])}
            if method in grid.sweeps:
                agg["sweep"] = grid.sweeps[method]
            if all("speedup" in r for r in rows):
                agg["target"] = mean_std([r["target"] for r in rows])
                agg["tokens_to_target"] = mean_std([r["tokens_to_target"] for r in rows])
                agg["speedup"] = mean_std([r["speedup"] for r in rows])
                agg["reached"] = sum(r["tokens_to_target"] is not None for r in rows)
                agg["final_loss_diff_se"] = mean_std([r["final_loss_diff_se"] for r in rows])
                if method != tuned.get(model):
                    agg.update(_intervals(rows))
            if all("compute_multiplier" in r for r in rows):
                agg.update(_multiplier(rows))
            if grid.budget_baselines and method == tuned.get(model):
                agg["budget_baselines"] = _budget_aggregates(grid, runs, model)
            if all("zero_shot" in r for r in rows):
                tasks = list(rows[0]["zero_shot"])
                agg["zero_shot"] = {t: mean_std([r["zero_shot"][t] for r in rows]) for t in tasks}
                agg["zero_shot_avg"] = mean_std([r["zero_shot_avg"] for r in rows])
            if all("analysis" in r for r in rows):
                agg["analysis"] = _analysis(rows)
            agg["curve"] = _mean_curve(rows)
            summary.setdefault(model, {})[method] = agg
    return summary


def _intervals(rows: List[dict]) -> dict:
    """The paired t-intervals over seeds of a method's speed-up, final-loss difference and loss ratio, and its claim."""
    out = {"speedup_ci": paired_interval([r["speedup"] for r in rows]),
           "final_loss_diff_ci": paired_interval([r["final_loss_diff"] for r in rows]),
           "loss_ratio_ci": paired_interval([r["loss_ratio_at_equal_tokens"] for r in rows], null=1.0)}
    if len(rows) < MIN_SEEDS:
        out["claim"] = f"n={len(rows)}: {out['speedup_ci']['note']}"
    else:
        out["claim"] = "; ".join([
            _claim("speed-up", out["speedup_ci"], len(rows), "{:+.1f}", pct=True,
                   missing="the others never reached the target"),
            _claim("final-loss difference", out["final_loss_diff_ci"], len(rows), "{:+.4f}")])
    return out


def _multiplier(rows: List[dict]) -> dict:
    """A method's effective compute multiplier over seeds: mean ± std, its interval (null 1), the count of each
    reason a seed has none, and its claim."""
    values = [r["compute_multiplier"] for r in rows]
    notes: Dict[str, int] = {}
    for r in rows:
        if r["compute_multiplier_note"]:
            notes[r["compute_multiplier_note"]] = notes.get(r["compute_multiplier_note"], 0) + 1
    ci = paired_interval(values, null=1.0)
    missing = ", ".join(f"{k} {note}" for note, k in notes.items())
    return {"compute_multiplier": mean_std(values), "compute_multiplier_ci": ci, "compute_multiplier_notes": notes,
            "compute_multiplier_claim": _claim("effective compute multiplier", ci, len(rows), "{:.3f}",
                                               missing=missing)}


def _budget_aggregates(grid: Grid, runs: Dict[str, dict], model: str) -> Dict[str, dict]:
    """``{budget baseline: {"multiplier", "train_iters", "seeds", "final_val_loss"}}`` of ``model``, over its
    finished seeds."""
    out = {}
    for name, m in grid.budget_baselines.items():
        rows = [runs[r.name] for r in grid.runs if (r.model, r.method) == (model, name) and r.name in runs]
        out[name] = {"multiplier": m, "train_iters": grid.run(model, name, grid.seeds[0]).train_iters,
                     "seeds": [r["seed"] for r in rows], "final_val_loss": mean_std([r["final_val_loss"] for r in rows])}
    return out


def _claim(name: str, ci: dict, seeds: int, fmt: str, pct: bool = False, missing: str = "") -> str:
    """E.g. ``speed-up +12.3% [95% CI +4.1%, +20.5%], n=5: distinguishable from zero``."""
    n = f"n={ci['n']}" if ci["n"] == seeds else f"n={ci['n']} of {seeds} seeds ({missing})"
    return f"{name} {format_interval(ci, fmt, pct, label=True)}, {n}: {verdict(ci)}"


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
