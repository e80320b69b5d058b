"""`compare` sweeps: list values under methods: expand into one method per combination, a swept baseline is
replaced by its tuned variant (lowest mean final val loss), and the report shows each sweep's sensitivity.
Pure, no training: the evaluations are fabricated curves."""

import json
import os

import pytest
from test_compare import ROOT, grid_yaml

from megatron_simreg.compare import report, summary
from megatron_simreg.compare.grid import _NAME, GridError, load_grid
from megatron_simreg.compare.statistics import mean_std

SEEDS = [1, 2, 3]
SWEEP = {"baseline": {"lr": [1.0e-3, 3.0e-3]}, "simreg": {"simreg-weight": [0.03, 0.1, 0.3]}}
TOKENS = [100, 200, 300, 400, 500]
# Where each SimReg weight's curve reaches the tuned baseline's target (3.2), per seed.
CROSSINGS = {"0p03": [340.0, 350.0, 360.0], "0p1": [290.0, 300.0, 310.0], "0p3": [310.0, 320.0, 330.0]}


def _line(slope):
    return {"iteration": 5, "tokens": TOKENS, "val_loss": [5.0 - slope * t for t in TOKENS]}


def _sweep_evals():
    """lr 1e-3 ends at 3.5, lr 3e-3 at 3.0 (the tuned one, listed second); SimReg reaches 3.2 at CROSSINGS.

    Smoothing keeps a straight line's inner points and lifts its ends: lr 3e-3's target is (3.4 + 3.0) / 2 = 3.2,
    reached at 500 tokens; a curve ``5 - 1.8 t / c`` reaches it at ``c`` exactly (between 200 and 400).
    """
    evals = {}
    for i, seed in enumerate(SEEDS):
        evals[f"dense.baseline_lr-0p001.s{seed}"] = _line(0.003)
        evals[f"dense.baseline_lr-0p003.s{seed}"] = _line(0.004)
        for w, cs in CROSSINGS.items():
            evals[f"dense.simreg_simreg-weight-{w}.s{seed}"] = _line(1.8 / cs[i])
    return evals


# ----------------------------------------------------------------------------- the grid


def test_sweep_expands_into_one_method_per_combination(tmp_path):
    g = load_grid(grid_yaml(tmp_path, seeds=[1], methods={
        "baseline": {}, "simreg": {"simreg-weight": [0.03, 0.1], "simreg-temperature": [0.05, 0.1]},
        "jreg": {"jreg-weight": 3.0}}))
    names = ["simreg_simreg-weight-0p03_simreg-temperature-0p05", "simreg_simreg-weight-0p03_simreg-temperature-0p1",
             "simreg_simreg-weight-0p1_simreg-temperature-0p05", "simreg_simreg-weight-0p1_simreg-temperature-0p1"]
    assert list(g.methods) == ["baseline", *names, "jreg"] and g.baselines == ["baseline"]
    assert all(_NAME.match(m) for m in g.methods)
    assert [r.name for r in g.runs] == [f"dense.{m}.s1" for m in g.methods]
    assert g.sweeps[names[1]] == {"method": "simreg", "values": {"simreg-weight": 0.03, "simreg-temperature": 0.1}}
    assert "baseline" not in g.sweeps and "jreg" not in g.sweeps and g.origin(names[2]) == "simreg"
    argv = " ".join(g.run("dense", names[2], 1).train_argv)
    assert "--simreg-weight 0.1 --simreg-temperature 0.05 --jreg-weight 0 --seed 1" in argv


def test_swept_baseline_gives_several_baselines(tmp_path):
    g = load_grid(grid_yaml(tmp_path, seeds=SEEDS, methods=SWEEP))
    assert g.baselines == ["baseline_lr-0p001", "baseline_lr-0p003"]
    assert len(g.runs) == 5 * 3 and g.run("dense", "baseline_lr-0p003", 2).name == "dense.baseline_lr-0p003.s2"
    base = g.run("dense", "baseline_lr-0p001", 1).train_argv
    assert base[base.index("--lr", base.index("--lr") + 1) + 1] == "0.001"  # after train's --lr 0.003: wins
    assert g.sweeps["simreg_simreg-weight-0p3"] == {"method": "simreg", "values": {"simreg-weight": 0.3}}


@pytest.mark.parametrize("methods, message", [
    ({"simreg": {"simreg-weight": []}}, "methods: simreg: simreg-weight: an empty sweep"),
    ({"simreg": {"simreg-weight": [[0.1, 0.3]]}}, "methods: simreg: simreg-weight: a sweep lists scalar values"),
    ({"simreg": {"simreg-weight": [0.1, {"a": 1}]}}, "methods: simreg: simreg-weight: a sweep lists scalar values"),
    ({"simreg": {"simreg-weight": [0.1, 0.1]}}, "methods: simreg: the sweep's method 'simreg_simreg-weight-0p1' is "
                                                 "named twice"),
    ({"simreg": {"simreg-weight": [0.1]}, "simreg_simreg-weight-0p1": {"simreg-weight": 0.2}}, "is named twice"),
    ({"simreg": {"lr-decay-style": ["cos ine"]}}, "methods: simreg: lr-decay-style: the value 'cos ine' cannot"),
    ({"baseline": {"simreg-weight": [0.0, 0.1]}}, "methods: baseline_simreg-weight-0p1 sets ['simreg-weight']"),
])
def test_bad_sweeps_are_refused(tmp_path, methods, message):
    with pytest.raises(GridError) as e:
        load_grid(grid_yaml(tmp_path, methods={"baseline": {}, **methods}))
    assert message in str(e.value)


# ----------------------------------------------------------------------------- the tuned baseline


def test_methods_are_paired_with_the_tuned_baseline(tmp_path):
    g = load_grid(grid_yaml(tmp_path, seeds=SEEDS, methods=SWEEP))
    evals = _sweep_evals()
    assert summary.tuned_baselines(g, {k: ev["val_loss"][-1] for k, ev in evals.items()}) == {
        "dense": "baseline_lr-0p003"}
    runs = summary.per_run(g, evals)
    for w, cs in CROSSINGS.items():
        for seed, c in zip(SEEDS, cs):
            r = runs[f"dense.simreg_simreg-weight-{w}.s{seed}"]
            assert r["baseline"] == "baseline_lr-0p003" and r["target"] == pytest.approx(3.2)
            assert r["tokens_to_target"] == pytest.approx(c) and r["speedup"] == pytest.approx(1 - c / 500)
            assert r["final_loss_diff"] == pytest.approx(5.0 - 900 / c - 3.0)
    # The untuned baseline is measured against the tuned one too: it never reaches 3.2 (it ends at 3.5).
    assert runs["dense.baseline_lr-0p001.s1"]["final_loss_diff"] == pytest.approx(0.5)
    agg = summary.summarize(g, runs)["dense"]
    assert {a["baseline"] for a in agg.values()} == {"baseline_lr-0p003"}
    assert "claim" not in agg["baseline_lr-0p003"] and agg["baseline_lr-0p001"]["reached"] == 0
    assert agg["baseline_lr-0p001"]["final_loss_diff_ci"]["mean"] == pytest.approx(0.5)
    sp = agg["simreg_simreg-weight-0p1"]["speedup_ci"]
    assert sp["mean"] == pytest.approx(0.4) and sp["n"] == 3 and sp["distinguishable"]
    assert agg["simreg_simreg-weight-0p03"]["sweep"] == {"method": "simreg", "values": {"simreg-weight": 0.03}}


def test_tuned_baseline_compares_variants_on_the_seeds_all_finished(tmp_path):
    g = load_grid(grid_yaml(tmp_path, seeds=SEEDS, methods=SWEEP))
    # lr 1e-3 is lower on average over its three seeds (2.67), but over seeds 1 and 2, which both finished,
    # lr 3e-3 is lower (2.9 < 3.0).
    finals = {"dense.baseline_lr-0p001.s1": 3.0, "dense.baseline_lr-0p001.s2": 3.0, "dense.baseline_lr-0p001.s3": 2.0,
              "dense.baseline_lr-0p003.s1": 2.9, "dense.baseline_lr-0p003.s2": 2.9}
    assert summary.tuned_baselines(g, finals) == {"dense": "baseline_lr-0p003"}
    # No seed that both finished: each variant's own seeds.
    only = {"dense.baseline_lr-0p001.s3": 2.0, "dense.baseline_lr-0p003.s1": 2.9}
    assert summary.tuned_baselines(g, only) == {"dense": "baseline_lr-0p001"}
    assert summary.tuned_baselines(g, {}) == {}


# ----------------------------------------------------------------------------- the report


def test_report_has_the_tuned_baseline_and_a_sensitivity_table_and_plot(tmp_path):
    g = load_grid(grid_yaml(tmp_path, seeds=SEEDS, methods=SWEEP))
    runs = summary.per_run(g, _sweep_evals())
    agg = summary.summarize(g, runs)
    out = tmp_path / "out"
    out.mkdir()
    paths = report.write_plots(str(out), agg)
    text = open(report.write_report(str(out), g, agg, [])).read()
    report.write_results(str(out), g, runs, agg, [])

    assert "- dense: `baseline_lr-0p003` (`--lr 0.003`)" in text
    assert "| dense | baseline_lr-0p003 | 3 | 3.0000 ± 0.0000 | not measured | 500 ± 0 | 3/3 | – |" in text
    assert "### Sensitivity: dense / simreg" in text and "### Sensitivity: dense / baseline" in text
    assert "| simreg-weight | seeds | final val loss | speed-up [95% CI] |" in text
    for w, value, speedup in (("0p03", "0.03", 0.3), ("0p1", "0.1", 0.4), ("0p3", "0.3", 0.36)):
        a = agg["dense"][f"simreg_simreg-weight-{w}"]
        loss = mean_std([5.0 - 900 / c for c in CROSSINGS[w]])
        assert a["final_val_loss"]["mean"] == pytest.approx(loss["mean"])
        ci = a["speedup_ci"]
        assert ci["mean"] == pytest.approx(speedup)
        assert (f"| {value} | 3 | {loss['mean']:.4f} ± {loss['std']:.4f} | {100 * speedup:+.1f}% "
                f"[{100 * ci['low']:+.1f}%, {100 * ci['high']:+.1f}%] |") in text
    assert "| 0.003 | 3 | 3.0000 ± 0.0000 | – (tuned baseline) |" in text
    for png in ("sensitivity_dense_simreg.png", "sensitivity_dense_baseline.png"):
        assert str(out / png) in paths and (out / png).stat().st_size > 1000 and f"({png})" in text
    res = json.load(open(out / "results.json"))
    assert res["sweeps"]["baseline_lr-0p001"] == {"method": "baseline", "values": {"lr": 0.001}}
    assert res["runs"]["dense.simreg_simreg-weight-0p1.s1"]["baseline"] == "baseline_lr-0p003"


def test_two_swept_flags_make_one_table_and_one_plot(tmp_path):
    g = load_grid(grid_yaml(tmp_path, seeds=[1, 2], methods={
        "baseline": {}, "simreg": {"simreg-weight": [0.01, 0.3], "simreg-temperature": [0.05, 0.1]}}))
    evals = {}
    for seed in (1, 2):
        evals[f"dense.baseline.s{seed}"] = _line(0.004)
        for i, m in enumerate(g.sweeps):
            evals[f"dense.{m}.s{seed}"] = _line(1.8 / (250 + 40 * i))
    agg = summary.summarize(g, summary.per_run(g, evals))
    out = tmp_path / "out"
    out.mkdir()
    report.write_plots(str(out), agg)
    text = open(report.write_report(str(out), g, agg, [])).read()
    assert "is swept" not in text  # one baseline: no tuned-baseline paragraph
    assert "| simreg-weight | simreg-temperature | seeds | final val loss | speed-up [95% CI] |" in text
    assert "| 0.3 | 0.1 | 2 | 2.5676 ± 0.0000 | +26.0% |" in text  # crosses at 370, ends at 5 - 900 / 370
    assert (out / "sensitivity_dense_simreg.png").stat().st_size > 1000
    assert not (out / "sensitivity_dense_baseline.png").exists()


def test_example_sweep_grid_is_valid():
    g = load_grid(os.path.join(ROOT, "examples", "compare_sweep.yaml"))
    assert g.baselines == ["baseline_lr-0p001", "baseline_lr-0p003"]
    assert list(g.methods)[2:] == ["simreg_simreg-weight-0p03", "simreg_simreg-weight-0p1", "simreg_simreg-weight-0p3"]
    assert len(g.runs) == 5 * 2 and {g.sweeps[m]["values"]["simreg-weight"] for m in list(g.methods)[2:]} == {
        0.03, 0.1, 0.3}
