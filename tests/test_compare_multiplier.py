"""`compare`'s effective compute multiplier: `data: compute-multipliers` adds longer baselines with their own full
schedule, and each method's final loss is placed on the baseline's loss-vs-budget line. Pure, no training: the
evaluations are fabricated."""

import json
import math

import pytest
from test_compare import grid_yaml

from megatron_simreg.compare import report, summary
from megatron_simreg.compare.grid import _NAME, GridError, load_grid
from megatron_simreg.compare.statistics import paired_interval

SEEDS = [1, 2, 3]
METHODS = {"baseline": {}, "simreg": {"simreg-weight": 0.1}, "jreg": {"jreg-weight": 3.0}}
DATA = {"train-iters": 13, "compute-multipliers": [1.5, 1.25]}
# The baseline's final losses at 1x, 1.25x, 1.5x (every seed), and each method's per seed.
BUDGET_LOSSES = {"baseline": 4.0, "baseline_x1p25": 3.8, "baseline_x1p5": 3.7}
FINALS = {"simreg": [3.9, 3.88, 3.92], "jreg": [3.75, 3.6, 4.1]}
SIMREG_MULTIPLIERS = [1.125, 1.15, 1.1]  # 1 + 0.25 * (4.0 - loss) / 0.2
JREG_MULTIPLIERS = [1.375, None, None]  # 1.25 + 0.25 * (3.8 - 3.75) / 0.1; beyond 1.5x; worse than 1x


def _grid(tmp_path, **over):
    return load_grid(grid_yaml(tmp_path, **{"seeds": SEEDS, "methods": METHODS, "data": DATA, **over}))


def _curve(final, tokens=(128, 256)):
    return {"iteration": 4, "tokens": list(tokens), "val_loss": [5.0, final]}


def _evals():
    evals = {}
    for i, seed in enumerate(SEEDS):
        for name, loss in BUDGET_LOSSES.items():
            evals[f"dense.{name}.s{seed}"] = _curve(loss)
        for method, losses in FINALS.items():
            evals[f"dense.{method}.s{seed}"] = _curve(losses[i])
    return evals


# ----------------------------------------------------------------------------- the grid


def test_multipliers_add_budget_baselines_with_their_own_schedule(tmp_path):
    g = _grid(tmp_path)
    assert g.budget_baselines == {"baseline_x1p25": 1.25, "baseline_x1p5": 1.5}  # in increasing multiplier
    assert all(_NAME.match(m) for m in g.budget_baselines)
    assert list(g.methods) == ["baseline", "simreg", "jreg"] and g.baselines == ["baseline"]
    assert [r.name for r in g.runs if r.seed == 1] == [
        "dense.baseline.s1", "dense.simreg.s1", "dense.jreg.s1", "dense.baseline_x1p25.s1", "dense.baseline_x1p5.s1"]
    base, x125, x15 = (g.run("dense", m, 2) for m in ("baseline", "baseline_x1p25", "baseline_x1p5"))
    assert (base.train_iters, x125.train_iters, x15.train_iters) == (13, math.ceil(13 * 1.25), math.ceil(13 * 1.5))
    assert x125.train_iters == 17 and x15.train_iters == 20
    # Only --train-iters differs: same schedule flags (--lr-warmup-iters unchanged), seed and regularizers off.
    assert x125.train_argv[:-1] == base.train_argv[:-1] and x125.train_argv[-2:] == ["--train-iters", "17"]
    assert "--lr-warmup-iters 2" in " ".join(x15.train_argv) and "compute-multipliers" not in " ".join(x15.train_argv)
    assert summary.tuned_baselines(g, {f"dense.{m}.s{s}": 3.0 for m in g.budget_baselines for s in SEEDS}) == {}


def test_float_error_does_not_add_an_iteration(tmp_path):
    g = _grid(tmp_path, data={"train-iters": 100, "compute-multipliers": [1.1]})  # 100 * 1.1 = 110.00000000000001
    assert g.run("dense", "baseline_x1p1", 1).train_iters == 110


@pytest.mark.parametrize("value, message", [
    ([1.0], "1.0 is not a number > 1"),
    ([1.25, 0.5], "0.5 is not a number > 1"),
    (["1.5"], "'1.5' is not a number > 1"),
    ([True], "True is not a number > 1"),
    ([float("nan")], "nan is not a number > 1"),
    (1.5, "expected a non-empty list of numbers > 1"),
    ([], "expected a non-empty list of numbers > 1"),
    ([1.5, 1.5], "[1.5, 1.5] repeats a multiplier"),
])
def test_bad_multipliers_are_refused(tmp_path, value, message):
    with pytest.raises(GridError) as e:
        _grid(tmp_path, data={"train-iters": 12, "compute-multipliers": value})
    assert "data: compute-multipliers: " + message in str(e.value)


@pytest.mark.parametrize("methods, message", [
    ({"baseline": {"lr": [1.0e-3, 3.0e-3]}}, "the baseline is swept"),
    ({"baseline": {}, "baseline_x1p5": {"lr": 1.0e-3}}, "a method is named 'baseline_x1p5'"),
])
def test_multipliers_with_a_swept_baseline_or_a_clashing_name_are_refused(tmp_path, methods, message):
    with pytest.raises(GridError) as e:
        _grid(tmp_path, methods=methods, data={"train-iters": 12, "compute-multipliers": [1.5]})
    assert message in str(e.value)


# ----------------------------------------------------------------------------- the multiplier


def test_multiplier_interpolates_between_the_bracketing_budgets():
    points = [(1.0, 4.0), (1.25, 3.8), (1.5, 3.7)]
    assert summary.compute_multiplier(points, 3.9)["compute_multiplier"] == pytest.approx(1.125)
    assert summary.compute_multiplier(points, 3.75)["compute_multiplier"] == pytest.approx(1.375)
    assert summary.compute_multiplier(points, 4.0)["compute_multiplier"] == 1.0
    assert summary.compute_multiplier(points, 3.6) == {
        "compute_multiplier": None, "compute_multiplier_note": "beyond the largest budget (> 1.5x)"}
    assert summary.compute_multiplier(points, 4.1) == {
        "compute_multiplier": None, "compute_multiplier_note": "worse than the baseline at equal budget"}
    # Not monotone (1.25x ends above 1x): the first bracketing pair decides, even above the 1x loss.
    assert summary.compute_multiplier([(1.0, 4.0), (1.25, 4.2), (1.5, 3.7)], 4.1)["compute_multiplier"] == \
        pytest.approx(1.125)
    assert summary.compute_multiplier([], 3.9)["compute_multiplier_note"] == "budget baselines unfinished"


def test_summary_has_each_methods_multiplier_over_seeds(tmp_path):
    g = _grid(tmp_path)
    runs = summary.per_run(g, _evals())
    for seed, m in zip(SEEDS, SIMREG_MULTIPLIERS):
        assert runs[f"dense.simreg.s{seed}"]["compute_multiplier"] == pytest.approx(m)
    assert [runs[f"dense.jreg.s{s}"]["compute_multiplier_note"] for s in SEEDS] == [
        None, "beyond the largest budget (> 1.5x)", "worse than the baseline at equal budget"]
    assert "compute_multiplier" not in runs["dense.baseline.s1"]
    assert "compute_multiplier" not in runs["dense.baseline_x1p5.s1"]

    agg = summary.summarize(g, runs)["dense"]
    assert list(agg) == ["baseline", "simreg", "jreg"]  # budget baselines are not methods
    ci = agg["simreg"]["compute_multiplier_ci"]
    expected = paired_interval(SIMREG_MULTIPLIERS, null=1.0)
    assert (ci["n"], ci["mean"]) == (3, pytest.approx(1.125)) and ci["std"] == pytest.approx(0.025)
    assert (ci["low"], ci["high"]) == (pytest.approx(expected["low"]), pytest.approx(expected["high"]))
    assert ci["low"] > 1.0 and ci["distinguishable"]
    assert agg["simreg"]["compute_multiplier_claim"].startswith("effective compute multiplier 1.125 [95% CI ")
    assert agg["simreg"]["compute_multiplier_claim"].endswith("n=3: distinguishable from one")
    jreg = agg["jreg"]
    assert jreg["compute_multiplier_ci"]["n"] == 1 and jreg["compute_multiplier"]["mean"] == pytest.approx(1.375)
    assert jreg["compute_multiplier_notes"] == {"beyond the largest budget (> 1.5x)": 1,
                                                "worse than the baseline at equal budget": 1}
    assert "n=1 of 3 seeds (1 beyond the largest budget (> 1.5x), 1 worse than" in jreg["compute_multiplier_claim"]
    budgets = agg["baseline"]["budget_baselines"]
    assert budgets["baseline_x1p25"]["final_val_loss"]["mean"] == pytest.approx(3.8)
    assert (budgets["baseline_x1p5"]["multiplier"], budgets["baseline_x1p5"]["train_iters"]) == (1.5, 20)


def test_a_seed_whose_budget_baseline_is_unfinished_has_no_multiplier(tmp_path):
    g = _grid(tmp_path)
    evals = _evals()
    del evals["dense.baseline_x1p5.s3"]
    runs = summary.per_run(g, evals)
    assert runs["dense.simreg.s3"]["compute_multiplier_note"] == "budget baselines unfinished"
    assert summary.summarize(g, runs)["dense"]["simreg"]["compute_multiplier_ci"]["n"] == 2


# ----------------------------------------------------------------------------- the report


def test_report_has_the_multiplier_section(tmp_path):
    g = _grid(tmp_path)
    runs = summary.per_run(g, _evals())
    agg = summary.summarize(g, runs)
    out = tmp_path / "out"
    out.mkdir()
    text = open(report.write_report(str(out), g, agg, [])).read()
    report.write_results(str(out), g, runs, agg, [])

    assert "## Effective compute multiplier" in text
    ci = agg["dense"]["simreg"]["compute_multiplier_ci"]
    assert f"| dense | simreg | 1.125 [{ci['low']:.3f}, {ci['high']:.3f}] | 3/3 | – |" in text
    assert ("| dense | jreg | 1.375 | 1/3 | 1 beyond the largest budget (> 1.5x); 1 worse than the baseline at "
            "equal budget |") in text
    assert "- dense / simreg: effective compute multiplier 1.125 [95% CI" in text
    assert "| dense | baseline | 1x | 13 | 3 | 4.0000 ± 0.0000 |" in text
    assert "| dense | baseline_x1p5 | 1.5x | 20 | 3 | 3.7000 ± 0.0000 |" in text
    assert "*effective compute multiplier*" in text  # in the Definitions
    assert "| dense | baseline_x1p25 |" not in text.split("## Effective compute multiplier")[0]  # not a method
    res = json.load(open(out / "results.json"))
    assert res["budget_baselines"] == {"baseline_x1p25": 1.25, "baseline_x1p5": 1.5}
    assert res["summary"]["dense"]["simreg"]["compute_multiplier"]["mean"] == pytest.approx(1.125)

    # Without compute-multipliers: no multiplier and no section.
    g = _grid(tmp_path, data={"train-iters": 13})
    runs = summary.per_run(g, {k: v for k, v in _evals().items() if ".baseline_x" not in k})
    agg = summary.summarize(g, runs)
    assert "compute_multiplier" not in runs["dense.simreg.s1"] and "budget_baselines" not in agg["dense"]["baseline"]
    assert "Effective compute multiplier" not in open(report.write_report(str(out), g, agg, [])).read()
