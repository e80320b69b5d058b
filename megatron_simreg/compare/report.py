"""``OUT/report.md`` (tables, embedded PNG plots) and ``OUT/results.json`` (the same numbers)."""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional

from . import statistics
from .grid import Grid
from .statistics import format_interval
from .summary import __doc__ as DEFINITIONS


def _ms(s: Optional[dict], fmt: str = "{:.4f}", pct: bool = False) -> str:
    """``mean ± std`` (or ``mean`` with one seed, ``–`` with none)."""
    if not s or s.get("mean") is None:
        return "–"
    k, unit = (100.0, "%") if pct else (1.0, "")
    text = fmt.format(k * s["mean"]) + unit
    if s.get("std") is not None:
        text += " ± " + fmt.replace("+", "").format(k * s["std"]) + unit
    return text


def _se_cell(s: dict) -> str:
    """A standard error's ``mean ± std`` over seeds, or ``not measured`` where no seed recorded one."""
    return _ms(s) if s["n"] else "not measured"


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header)))
            + "|", *("| " + " | ".join(r) + " |" for r in rows), ""]


def write_results(out: str, grid: Grid, runs: Dict[str, dict], summary: dict, missing: List[str],
                  contamination: Optional[dict] = None) -> str:
    path = os.path.join(out, "results.json")
    data = {"grid": grid.path, "seeds": grid.seeds, "models": list(grid.models), "methods": list(grid.methods),
            "sweeps": grid.sweeps, "budget_baselines": grid.budget_baselines, "unfinished_runs": missing, "contamination": contamination, "runs": runs,
            "summary": summary}
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def write_report(out: str, grid: Grid, summary: dict, missing: List[str], contamination: Optional[dict] = None) -> str:
    lines = ["# Comparison report", "", f"Grid: `{grid.path}`; seeds {grid.seeds}; "
             f"{len(grid.runs) - len(missing)} of {len(grid.runs)} runs finished.", ""]
    if missing:
        lines += [f"**Unfinished runs, left out below:** {', '.join(missing)}.", ""]
    lines += _contamination_lines(contamination)
    lines += ["## Convergence", ""]
    lines += _baseline_lines(grid, summary)
    rows = []
    for model, methods in summary.items():
        for method, agg in methods.items():
            reached = (f"{agg['reached']}/{len(agg['seeds'])}" if "reached" in agg else "–")
            rows.append([model, method, str(len(agg["seeds"])), _ms(agg["final_val_loss"]),
                         _se_cell(agg["final_val_loss_se"]),
                         _ms(agg.get("tokens_to_target"), "{:,.0f}"), reached,
                         "–" if _is_reference(method, agg) else _ms(agg.get("speedup"), "{:+.1f}", pct=True)])
    lines += _table(["model", "method", "seeds", "final val loss", "final val loss SE", "tokens to target", "reached",
                     "speed-up"], rows)
    lines += _paired_section(summary)
    for model in summary:
        lines += [f"![validation loss, {model}](val_loss_{model}.png)", ""]
    lines += _multiplier_section(grid, summary)
    lines += _sensitivity_section(summary)

    tasks = next((list(a["zero_shot"]) for m in summary.values() for a in m.values() if "zero_shot" in a), None)
    if tasks:
        lines += ["## Zero-shot accuracy (lm-evaluation-harness)", ""]
        rows = [[model, method, *(_ms(agg["zero_shot"][t], "{:.1f}", pct=True) for t in tasks),
                 _ms(agg["zero_shot_avg"], "{:.1f}", pct=True)]
                for model, methods in summary.items() for method, agg in methods.items() if "zero_shot" in agg]
        lines += _table(["model", "method", *tasks, "average"], rows)
        if grid.zero_shot_limit:
            lines += [f"Each task limited to its first {grid.zero_shot_limit} examples.", ""]

    analysed = [(model, method, agg["analysis"]) for model, methods in summary.items()
                for method, agg in methods.items() if "analysis" in agg]
    if analysed:
        lines += ["## Representations (SimReg paper)", "",
                  f"Final hidden states (after the final norm) of {grid.analysis_sequences} validation sequences "
                  "per run: mean cosine similarity of token pairs in one sequence with the same next-token label "
                  "(intra) and with different labels (inter); classification margin = logit of the true next token "
                  "minus the best other logit.", ""]
        rows = [[model, method, _ms(a["intra_cos"]), _ms(a["inter_cos"]), _ms(a["inter_intra_gap"]),
                 _ms(a["margin_mean"], "{:.3f}"), _ms(a["margin_frac_positive"], "{:.1f}", pct=True)]
                for model, method, a in analysed]
        lines += _table(["model", "method", "intra cos", "inter cos", "intra − inter", "mean margin",
                         "margin > 0"], rows)
        lines += [f"![margins, {m}](margins_{m}.png)" for m in summary] + [""]
        lines += ["## Layer jumps (JREG paper)", "",
                  "Angular distance `arccos(cos(h_(l-1), h_l)) / pi` between consecutive decoder states (layer "
                  "inputs/outputs before the final norm), averaged over tokens; jump strength = last layer's "
                  "distance / mean of the earlier ones.", ""]
        rows = [[model, method, _ms(a["layer_distances"][-1]), _ms(a["jump_strength"], "{:.2f}")]
                for model, method, a in analysed]
        lines += _table(["model", "method", "last-layer distance", "jump strength"], rows)
        lines += [f"![layer distances, {m}](layer_distance_{m}.png)" for m in summary] + [""]
    lines += ["## Definitions", "", _definitions(DEFINITIONS), "", _definitions(statistics.__doc__), "",
              "All numbers are in `results.json`; each run's flags are in `runs/<name>/run.json`.", ""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _contamination_lines(result: Optional[dict]) -> List[str]:
    """The held-out splits' n-gram overlap with training, and a warning above the documented threshold."""
    from ..data.contamination import WARN_SHARE, describe

    if not result:
        return []
    lines = [describe(result).replace("contamination", "Contamination", 1) + ".", ""]
    if any((r["shared"] or 0) > WARN_SHARE for r in result.values()):
        lines = [f"**Warning: the validation data repeats the training data** (share above {WARN_SHARE}); the "
                 "validation loss partly measures memorisation.", ""] + lines
    return lines


def _paired_section(summary: dict) -> List[str]:
    """The paired differences vs the baseline: a table of means and t-intervals, then one claim per method."""
    paired = [(model, method, agg) for model, methods in summary.items() for method, agg in methods.items()
              if "claim" in agg]
    if not paired:
        return []
    rows = [[model, method, str(len(agg["seeds"])), _speedup_cell(agg), format_interval(agg["final_loss_diff_ci"]),
             _se_cell(agg["final_loss_diff_se"]),
             format_interval(agg["loss_ratio_ci"], "{:.4f}")] for model, method, agg in paired]
    level = f"{paired[0][2]['speedup_ci']['confidence']:.0%}"
    return ["### Paired differences vs baseline", "",
            f"Each method against the baseline run with the same model and seed; mean [{level} CI] over seeds, "
            "the CI a two-sided t-interval over the paired seeds (n − 1 degrees of freedom). With fewer than "
            f"{statistics.MIN_SEEDS} seeds no interval is given and no claim is made. The speed-up's interval "
            "covers the seeds that reached the target. The validation noise is the final-loss difference's standard "
            "error from the finite validation sample (mean over seeds): where it is small next to the interval, "
            "the interval's width is seed-to-seed training noise, which only more seeds reduce.", "",
            *_table(["model", "method", "n", f"speed-up [{level} CI]", f"final-loss diff [{level} CI]",
                     "its validation noise (SE)", f"loss ratio at equal tokens [{level} CI]"], rows),
            *(f"- {model} / {method}: {agg['claim']}" for model, method, agg in paired), ""]


def _multiplier_section(grid: Grid, summary: dict) -> List[str]:
    """The effective compute multiplier per method, and the budget baselines' final losses behind it."""
    if not grid.budget_baselines:
        return []
    budgets = [(model, agg) for model, methods in summary.items() for agg in methods.values()
               if "budget_baselines" in agg]
    rows = [[model, method, f"{a['multiplier']:g}x", f"{a['train_iters']:,}", str(len(a["seeds"])),
             _ms(a["final_val_loss"])]
            for model, agg in budgets
            for method, a in [(agg["baseline"], {**agg, "multiplier": 1.0,
                                                 "train_iters": grid.run(model, agg["baseline"], grid.seeds[0])
                                                 .train_iters}),
                              *agg["budget_baselines"].items()]]
    methods = [(model, method, agg) for model, ms in summary.items() for method, agg in ms.items()
               if "compute_multiplier_ci" in agg]
    level = f"{methods[0][2]['compute_multiplier_ci']['confidence']:.0%} " if methods else ""
    table = [[model, method, format_interval(agg["compute_multiplier_ci"], "{:.3f}"),
              f"{agg['compute_multiplier_ci']['n']}/{len(agg['seeds'])}",
              "; ".join(f"{k} {note}" for note, k in agg["compute_multiplier_notes"].items()) or "–"]
             for model, method, agg in methods]
    return ["## Effective compute multiplier", "",
            "The budget multiple at which the baseline, trained with its own full learning-rate schedule to that "
            "budget, ends at the method's final validation loss: 1.25 means the method's loss costs the baseline "
            "25% more compute. Per seed, interpolated linearly between the two budgets whose final losses bracket "
            "the method's; unlike tokens-to-target, it does not compare the method with a baseline that is still "
            "annealing. Seeds whose loss no budget brackets are counted, not averaged.", "",
            *_table(["model", "method", f"multiplier [{level}CI]", "seeds in range", "out of range"], table),
            *(f"- {model} / {method}: {agg['compute_multiplier_claim']}" for model, method, agg in methods), "",
            "Final validation loss of the baseline at each budget (mean ± std over seeds):", "",
            *_table(["model", "baseline", "budget", "iterations", "seeds", "final val loss"], rows)]


def _is_reference(method: str, agg: dict) -> bool:
    """Whether ``method`` is the baseline the others are measured against (the tuned one, when swept)."""
    return method == agg.get("baseline", "baseline")


def _reference(methods: dict) -> Optional[str]:
    """One model's baseline the others are measured against (``None``: no baseline run finished)."""
    return next(iter(methods.values())).get("baseline", "baseline")


def _baseline_lines(grid: Grid, summary: dict) -> List[str]:
    """Which baseline variant each model's methods are measured against, when the baseline is swept."""
    if len(grid.baselines) < 2:
        return []
    tuned = {model: _reference(methods) for model, methods in summary.items()}
    return [f"The baseline is swept ({len(grid.baselines)} variants); each method is measured against the *tuned "
            "baseline*, the variant with the lowest mean final validation loss over the seeds that every variant "
            "finished:", "",
            *(f"- {model}: `{name}` (`{' '.join(grid.methods[name]) or 'no flags'}`)" if name else
              f"- {model}: no baseline variant finished" for model, name in tuned.items()), ""]


def _sweep_groups(methods: dict) -> Dict[str, List[tuple]]:
    """``{method in the grid file: [(swept method, aggregate), ...]}`` for one model's swept methods."""
    groups: Dict[str, List[tuple]] = {}
    for method, agg in methods.items():
        if "sweep" in agg:
            groups.setdefault(agg["sweep"]["method"], []).append((method, agg))
    return groups


def _sensitivity_section(summary: dict) -> List[str]:
    """Per swept method: its values -> final val loss and speed-up, a table and the plot."""
    lines = []
    for model, methods in summary.items():
        for origin, variants in _sweep_groups(methods).items():
            flags = list(variants[0][1]["sweep"]["values"])
            level = next((f"{a['speedup_ci']['confidence']:.0%} " for _, a in variants if "speedup_ci" in a), "")
            rows = [[*(str(agg["sweep"]["values"][f]) for f in flags), str(len(agg["seeds"])),
                     _ms(agg["final_val_loss"]), _sensitivity_speedup(method, agg)] for method, agg in variants]
            lines += [f"### Sensitivity: {model} / {origin}", "",
                      *_table([*flags, "seeds", "final val loss", f"speed-up [{level}CI]"], rows),
                      f"![sensitivity, {model} / {origin}]({_sensitivity_png(model, origin)})", ""]
    return (["## Sensitivity", "", "Each swept method's values against its final validation loss (mean ± std over "
             "seeds) and its speed-up over the baseline (mean [CI] over the paired seeds).", ""] + lines
            if lines else [])


def _sensitivity_speedup(method: str, agg: dict) -> str:
    if _is_reference(method, agg):
        return "– (tuned baseline)"
    return _speedup_cell(agg) if "speedup_ci" in agg else "–"


def _sensitivity_png(model: str, origin: str) -> str:
    return f"sensitivity_{model}_{origin}.png"


def _speedup_cell(agg: dict) -> str:
    """The speed-up's mean [CI], with its own ``n`` where some seeds never reached the target."""
    ci = agg["speedup_ci"]
    text = format_interval(ci, "{:+.1f}", pct=True)
    return text if ci["n"] == len(agg["seeds"]) else f"{text} (n={ci['n']})"


def _definitions(doc: str) -> str:
    """The ``Definitions:`` part of a module docstring, in markdown."""
    text = re.sub(r":(?:func|data):`~?([\w.]+)`", r"`\1`", doc.split("Definitions:", 1)[1])
    return text.replace("``", "`").strip()


MIN_SEEDS_FOR_SPEEDUP = 3  # fewer seeds reaching the target: the legend shows no mean speed-up


def legend_label(method: str, agg: dict) -> str:
    """A method's legend entry: its mean speed-up over the seeds that reached the target, with how many of how many
    did (``n of N``); only the count when fewer than MIN_SEEDS_FOR_SPEEDUP did."""
    if _is_reference(method, agg) or "reached" not in agg:
        return method
    reached, total = agg["reached"], len(agg["seeds"])
    if reached < MIN_SEEDS_FOR_SPEEDUP or agg["speedup"].get("mean") is None:
        return f"{method} ({reached} of {total} seeds reached the target)"
    return f"{method} (speed-up {_ms(agg['speedup'], '{:+.1f}', pct=True)}, {reached} of {total} seeds)"


def write_plots(out: str, summary: dict) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for model, methods in summary.items():
        fig, ax = plt.subplots(figsize=(6.5, 4))
        reference = _reference(methods)
        base = methods.get(reference)
        for i, (method, agg) in enumerate(methods.items()):
            c = agg["curve"]
            label = legend_label(method, agg)
            ax.plot(c["tokens"], c["mean"], marker="o", markersize=2.5, color=f"C{i}", label=label)
            if c["std"]:
                lo = [m - s for m, s in zip(c["mean"], c["std"])]
                hi = [m + s for m, s in zip(c["mean"], c["std"])]
                ax.fill_between(c["tokens"], lo, hi, color=f"C{i}", alpha=0.2, linewidth=0)
            t = agg.get("tokens_to_target", {}).get("mean")
            if t is not None and not _is_reference(method, agg):
                ax.axvline(t, color=f"C{i}", linestyle="--", linewidth=1)
        if base and "target" in base:
            ax.axhline(base["target"]["mean"], color="gray", linestyle=":", linewidth=1,
                       label=f"{reference} smoothed final (target)")
        ax.set(xlabel="tokens", ylabel="validation loss", title=f"{model}: validation loss (mean ± std over seeds)")
        ax.legend(fontsize=8)
        paths.append(_save(fig, out, f"val_loss_{model}.png"))
        paths += [_sensitivity_plot(plt, out, model, origin, variants)
                  for origin, variants in _sweep_groups(methods).items()]

        analysed = {m: a["analysis"] for m, a in methods.items() if "analysis" in a}
        if not analysed:
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for i, (method, an) in enumerate(analysed.items()):
            d = an["layer_distances"]
            ax.errorbar(range(1, len(d) + 1), [x["mean"] for x in d], yerr=[x["std"] or 0.0 for x in d],
                        marker="o", capsize=3, label=method)
        ax.set(xlabel="layer l", ylabel="angular distance d_l", title=f"{model}: per-layer angular distance",
               xticks=range(1, len(d) + 1))
        ax.legend(fontsize=8)
        paths.append(_save(fig, out, f"layer_distance_{model}.png"))

        fig, ax = plt.subplots(figsize=(6.5, 4))
        for i, (method, an) in enumerate(analysed.items()):
            h = an["margin_hist"]
            edges = list(h["edges"])
            if len(h["counts"]) == len(edges) + 1:  # open end bins: drawn one bin-width wide
                edges = [2 * edges[0] - edges[1]] + edges + [2 * edges[-1] - edges[-2]]
            total = max(1, sum(h["counts"]))
            # Density, not counts: the bins are wider in the tails, which counts would exaggerate.
            ax.stairs([c / total / (hi - lo) for c, lo, hi in zip(h["counts"], edges[:-1], edges[1:])], edges,
                      label=method, linewidth=1.5)
        ax.axvline(0.0, color="gray", linestyle=":", linewidth=1)
        ax.set(xlabel="margin (true logit − best other)", ylabel="density (fraction of tokens per unit)",
               title=f"{model}: classification margins")
        ax.legend(fontsize=8)
        paths.append(_save(fig, out, f"margins_{model}.png"))
    return paths


def _sensitivity_plot(plt, out: str, model: str, origin: str, variants: List[tuple]) -> str:
    """Final val loss (mean ± std) and speed-up (mean and CI) against the first swept flag, one line per value of
    the others; a log x axis when the values are positive numbers spanning more than 10x."""
    flags = list(variants[0][1]["sweep"]["values"])
    values = [agg["sweep"]["values"][flags[0]] for _, agg in variants]
    xs = [_number(v) for v in values]
    ticks = None
    if None in xs:  # not all numbers: evenly spaced, in the listed order
        ticks = list(dict.fromkeys(map(str, values)))
        xs = [ticks.index(str(v)) for v in values]
    lines: Dict[str, List[tuple]] = {}
    for x, (_, agg) in zip(xs, variants):
        label = ", ".join(f"{f}={agg['sweep']['values'][f]}" for f in flags[1:]) or origin
        lines.setdefault(label, []).append((x, agg))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (label, points) in enumerate(lines.items()):
        points.sort(key=lambda p: p[0])
        for ax, (ys, errs) in zip(axes, _panels([a for _, a in points])):
            ax.errorbar([x for x, _ in points], ys, yerr=errs, marker="o", capsize=3, color=f"C{i}", label=label)
    log = ticks is None and min(xs) > 0 and max(xs) > 10 * min(xs)
    for ax, ylabel in zip(axes, ("final validation loss (mean ± std)", "speed-up, % (mean and CI)")):
        ax.set(xlabel=flags[0], ylabel=ylabel, xscale="log" if log else "linear")
        if ticks is not None:
            ax.set_xticks(range(len(ticks)), ticks)
    axes[1].axhline(0.0, color="gray", linestyle=":", linewidth=1)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{model}: sensitivity of {origin}")
    return _save(fig, out, _sensitivity_png(model, origin))


def _panels(aggs: List[dict]) -> List[tuple]:
    """The sensitivity plot's two panels, ``(y values, error bars)`` each: final val loss ± std; speed-up (%) and
    its CI (none where there is no interval)."""
    loss = [a["final_val_loss"] for a in aggs]
    cis = [a.get("speedup_ci") or {} for a in aggs]
    speedups = [100 * _nan(a.get("speedup", {}).get("mean")) for a in aggs]
    below = [y - 100 * ci["low"] if ci.get("low") is not None else 0.0 for y, ci in zip(speedups, cis)]
    above = [100 * ci["high"] - y if ci.get("high") is not None else 0.0 for y, ci in zip(speedups, cis)]
    return [([_nan(s["mean"]) for s in loss], [s["std"] or 0.0 for s in loss]), (speedups, [below, above])]


def _nan(value: Optional[float]) -> float:
    return float("nan") if value is None else value


def _number(value) -> Optional[float]:
    """A swept value as a number (``"1e-3"`` included: YAML reads it as a string), ``None`` if it is not one."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _save(fig, out: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
