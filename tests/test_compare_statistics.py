"""`compare`'s statistics: paired t-intervals over seeds (coverage, power, the 3-seed rule), tokens-to-target on
smoothed curves, and the paired numbers, intervals and claims in the summary and the report. Pure, no training."""

import math
import random

import pytest
from test_compare import grid_yaml

from megatron_simreg.analysis.convergence import loss_at, smooth, tokens_to_target
from megatron_simreg.compare import report, statistics, summary
from megatron_simreg.compare.grid import load_grid
from megatron_simreg.compare.statistics import paired_interval

T4 = 2.7764451051977987  # t(0.975, 4 degrees of freedom)


# ----------------------------------------------------------------------------- paired intervals


def _simulate(effect, sigma=1.0, n=5, experiments=400, seed=0):
    rng = random.Random(seed)
    return [paired_interval([rng.gauss(effect, sigma) for _ in range(n)]) for _ in range(experiments)]


def test_interval_covers_the_true_mean_95_percent_of_the_time():
    cis = _simulate(effect=0.7, sigma=2.0)
    coverage = sum(ci["low"] <= 0.7 <= ci["high"] for ci in cis) / len(cis)
    assert 0.93 <= coverage <= 0.97
    # A normal interval (1.96 instead of t = 2.78 at 4 degrees of freedom) would cover far less: the t matters.
    normal = sum(abs(ci["mean"] - 0.7) <= 1.96 * ci["std"] / math.sqrt(5) for ci in cis) / len(cis)
    assert normal < 0.91


def test_zero_effect_is_rarely_distinguishable_and_a_large_one_always():
    zero = _simulate(effect=0.0, seed=1)
    assert 0.93 <= sum(not ci["distinguishable"] for ci in zero) / len(zero) <= 0.97
    assert all(ci["n"] == 5 and "note" not in ci for ci in zero)
    large = _simulate(effect=3.0, seed=2)  # 3 sigma per seed: t = 3 sqrt(5) = 6.7 on average, vs 2.78
    assert sum(ci["distinguishable"] for ci in large) / len(large) >= 0.99


def test_interval_numbers_and_the_ratio_null():
    ci = paired_interval([1.0, 2.0, None, 3.0, 4.0, float("nan"), 5.0])
    half = T4 * math.sqrt(2.5) / math.sqrt(5)
    assert (ci["n"], ci["mean"], ci["std"]) == (5, 3.0, pytest.approx(math.sqrt(2.5)))
    assert (ci["low"], ci["high"]) == (pytest.approx(3.0 - half), pytest.approx(3.0 + half))
    assert ci["distinguishable"] and statistics.verdict(ci) == "distinguishable from zero"
    assert statistics.format_interval(ci, "{:+.2f}", label=True) == "+3.00 [95% CI +1.04, +4.96]"
    near_one = paired_interval([1.02, 0.97, 1.01, 0.99], null=1.0)
    assert not near_one["distinguishable"] and statistics.verdict(near_one) == "not distinguishable from one at n=4"
    assert paired_interval([0.90, 0.92, 0.91], null=1.0)["distinguishable"]


@pytest.mark.parametrize("values", [[0.3, 0.5], [0.3], []])
def test_fewer_than_three_seeds_make_no_claim(values):
    ci = paired_interval(values)
    assert ci["low"] is None and ci["high"] is None and ci["distinguishable"] is None
    assert ci["note"] == "fewer than 3 seeds: no claim can be made" == statistics.verdict(ci)
    mean = f"{sum(values) / len(values) * 100:+.1f}%" if values else "–"
    assert statistics.format_interval(ci, "{:+.1f}", pct=True) == mean  # the mean alone


def test_t_quantile_table_matches_scipy(monkeypatch):
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 31):
        assert statistics.T975[df - 1] == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4)
    assert statistics.Z975 == pytest.approx(stats.norm.ppf(0.975), abs=1e-3)
    assert statistics.t_quantile(0.975, 4) == pytest.approx(T4)
    monkeypatch.setitem(__import__("sys").modules, "scipy.stats", None)  # as if scipy were not installed
    assert statistics.t_quantile(0.975, 4) == 2.776 and statistics.t_quantile(0.975, 200) == 1.960
    with pytest.raises(ValueError, match="needs scipy"):
        statistics.t_quantile(0.95, 4)


# ----------------------------------------------------------------------------- smoothed tokens-to-target

TOKENS = [100, 200, 300, 400, 500, 600, 700, 800]
BASE = [5.0, 4.0, 3.5, 3.2, 3.0, 2.9, 2.85, 2.8]


def test_smooth_and_loss_at():
    assert smooth([3.0, 6.0, 0.0, 3.0]) == pytest.approx([4.5, 3.0, 3.0, 1.5])
    assert smooth([1.0, 2.0, 3.0, 4.0, 5.0], window=5) == pytest.approx([2.0, 2.5, 3.0, 3.5, 4.0])
    assert smooth([2.0]) == [2.0]
    with pytest.raises(ValueError):
        smooth([1.0, 2.0], window=2)
    assert loss_at(TOKENS, BASE, 250) == pytest.approx(3.75) and loss_at(TOKENS, BASE, 800) == 2.8
    assert loss_at(TOKENS, BASE, 900) is None and loss_at(TOKENS, BASE, 50) is None


def test_one_noisy_dip_does_not_move_tokens_to_target():
    clean = [5.0, 3.9, 3.4, 3.1, 2.9, 2.8, 2.75, 2.7]
    dipped = [5.0, 2.7, 3.4, 3.1, 2.9, 2.8, 2.75, 2.7]  # one evaluation at 200 tokens is 1.2 too low
    base = {"tokens": TOKENS, "val_loss": BASE}
    target = (2.85 + 2.8) / 2  # the baseline's smoothed final loss
    # The raw curve crosses the target at the dip, at ~195 tokens, instead of ~593.
    raw = tokens_to_target(TOKENS, dipped, target)
    assert raw == pytest.approx(100 + 100 * (5.0 - target) / (5.0 - 2.7))
    # On the smoothed curves: (3.1 + 2.9 + 2.8) / 3 at 500 tokens, (2.9 + 2.8 + 2.75) / 3 at 600.
    at500, at600 = 8.8 / 3, 8.45 / 3
    expected = 500 + 100 * (at500 - target) / (at500 - at600)
    with_dip = summary.paired(dict(base, val_loss=dipped), base)
    without = summary.paired(dict(base, val_loss=clean), base)
    assert with_dip["target"] == pytest.approx(target) and with_dip["baseline_tokens_to_target"] == pytest.approx(800)
    assert with_dip["tokens_to_target"] == pytest.approx(expected) == without["tokens_to_target"]
    assert with_dip["speedup"] == pytest.approx(1 - expected / 800)
    assert expected > 590 and raw < 200


# ----------------------------------------------------------------------------- summary and report

CROSSINGS = [300.0, 320.0, 280.0, 310.0, 290.0]  # where each seed's method curve reaches the target
BATCHES = [-0.2, 0.1, 0.3, -0.2]  # the final evaluation's per-batch deviations, shared by the runs of a seed
BATCH_NOISE = [0.01, -0.01, 0.02, -0.02]  # the method's own per-batch deviations: SE sqrt(0.001 / 3) / 2


def _linear_evals(seeds, se=None):
    """Baseline ``5 - 0.004 t`` and a method ``5 - 1.8 t / c`` per seed (``c`` from CROSSINGS), at 100..500 tokens.

    Smoothing leaves a straight line's inner points as they are and lifts its ends: the target is the
    baseline's (3.4 + 3.0) / 2 = 3.2, reached by the baseline at 500 and by the method at ``c`` exactly.
    """
    tokens = [100, 200, 300, 400, 500]
    evals = {}
    for seed, c in zip(seeds, CROSSINGS):
        for method, slope in (("baseline", 0.004), ("simreg", 1.8 / c)):
            ev = {"iteration": 5, "tokens": tokens, "val_loss": [5.0 - slope * t for t in tokens]}
            if se is not None:
                ev["val_loss_se"] = [se] * len(tokens)
                shift = 0.0 if method == "baseline" else ev["val_loss"][-1] - 3.0
                ev["final_val_batches"] = {"sha256": f"seed {seed}", "losses": [
                    3.0 + b + shift + (0.0 if method == "baseline" else n) for b, n in zip(BATCHES, BATCH_NOISE)]}
            evals[f"dense.{method}.s{seed}"] = ev
    return evals


def test_summary_gives_paired_intervals_and_a_claim(tmp_path):
    seeds = [1, 2, 3, 4, 5]
    g = load_grid(grid_yaml(tmp_path, seeds=seeds))
    runs = summary.per_run(g, _linear_evals(seeds, se=0.01))
    for seed, c in zip(seeds, CROSSINGS):
        r = runs[f"dense.simreg.s{seed}"]
        assert r["target"] == pytest.approx(3.2) and r["tokens_to_target"] == pytest.approx(c)
        assert r["speedup"] == pytest.approx(1 - c / 500)
        assert r["final_loss_diff"] == pytest.approx((5.0 - 900 / c) - 3.0)
        assert r["loss_ratio_at_equal_tokens"] == pytest.approx((5.0 - 900 / c) / 3.0)
        assert r["final_val_loss_se"] == 0.01
        assert r["final_loss_diff_se"] == pytest.approx(math.sqrt(0.001 / 3) / 2)
    agg = summary.summarize(g, runs)["dense"]
    assert "claim" not in agg["baseline"] and "speedup_ci" not in agg["baseline"]
    sp = agg["simreg"]["speedup_ci"]  # speed-ups 0.40, 0.36, 0.44, 0.38, 0.42: std sqrt(0.004 / 4)
    half = T4 * math.sqrt(0.001) / math.sqrt(5)
    assert (sp["n"], sp["mean"]) == (5, pytest.approx(0.4))
    assert (sp["low"], sp["high"]) == (pytest.approx(0.4 - half), pytest.approx(0.4 + half))
    assert sp["distinguishable"]
    diffs = [2.0 - 900 / c for c in CROSSINGS]
    fl = agg["simreg"]["final_loss_diff_ci"]
    assert fl["mean"] == pytest.approx(sum(diffs) / 5) and fl["high"] < 0 and fl["distinguishable"]
    ratio = agg["simreg"]["loss_ratio_ci"]
    assert ratio["null"] == 1.0 and ratio["mean"] == pytest.approx(sum((5.0 - 900 / c) / 3.0 for c in CROSSINGS) / 5)
    assert ratio["high"] < 1.0 and ratio["distinguishable"]
    assert agg["simreg"]["final_val_loss_se"]["mean"] == 0.01
    fl_text = statistics.format_interval(fl, label=True)
    assert agg["simreg"]["claim"] == ("speed-up +40.0% [95% CI +36.1%, +43.9%], n=5: distinguishable from zero; "
                                      f"final-loss difference {fl_text}, n=5: distinguishable from zero")

    out = tmp_path / "out"
    out.mkdir()
    text = open(report.write_report(str(out), g, summary.summarize(g, runs), [])).read()
    assert "### Paired differences vs baseline" in text and "t-interval over the paired seeds" in text
    assert "With fewer than 3 seeds no interval is given and no claim is made" in text
    assert agg["simreg"]["final_loss_diff_se"]["mean"] == pytest.approx(math.sqrt(0.001 / 3) / 2)
    row = (f"| dense | simreg | 5 | +40.0% [+36.1%, +43.9%] | {statistics.format_interval(fl)} | 0.0091 ± 0.0000 | "
           f"{statistics.format_interval(ratio, '{:.4f}')} |")
    assert row in text
    assert f"- dense / simreg: {agg['simreg']['claim']}" in text
    assert "| dense | simreg | 5 | 1.9933 ± 0.1588 | 0.0100 ± 0.0000 |" in text  # the SE column, measured
    assert "## Definitions" in text and "*smoothed curve*" in text and "*distinguishable*" in text


def test_some_seeds_never_reach_the_target_and_two_seeds_make_no_claim(tmp_path):
    seeds = [1, 2, 3, 4, 5]
    g = load_grid(grid_yaml(tmp_path, seeds=seeds))
    evals = _linear_evals(seeds)
    for s in (4, 5):  # these seeds' method stays above the target
        evals[f"dense.simreg.s{s}"]["val_loss"] = [5.0, 4.8, 4.6, 4.4, 4.2]
    agg = summary.summarize(g, summary.per_run(g, evals))["dense"]["simreg"]
    assert agg["reached"] == 3 and agg["speedup_ci"]["n"] == 3 and agg["final_loss_diff_ci"]["n"] == 5
    assert "n=3 of 5 seeds (the others never reached the target)" in agg["claim"]
    out = tmp_path / "five"
    out.mkdir()
    text = open(report.write_report(str(out), g, {"dense": {"simreg": agg}}, [])).read()
    speedup = statistics.format_interval(agg["speedup_ci"], "{:+.1f}", pct=True)
    assert f"| dense | simreg | 5 | {speedup} (n=3) |" in text  # the interval's own n
    assert agg["final_val_loss_se"] == {"mean": None, "std": None, "n": 0}

    two = load_grid(grid_yaml(tmp_path, name="two.yaml", seeds=[1, 2]))
    runs = summary.per_run(two, _linear_evals([1, 2]))
    assert runs["dense.simreg.s1"]["final_val_loss_se"] is None
    agg = summary.summarize(two, runs)
    assert agg["dense"]["simreg"]["claim"] == "n=2: fewer than 3 seeds: no claim can be made"
    assert agg["dense"]["simreg"]["speedup_ci"]["low"] is None
    out = tmp_path / "out"
    out.mkdir()
    text = open(report.write_report(str(out), two, agg, [])).read()
    assert "| dense | simreg | 2 | +38.0% | " in text  # the mean alone, no interval
    assert runs["dense.simreg.s1"]["final_loss_diff_se"] is None  # no batches recorded
    assert "| not measured |" in text
    assert "- dense / simreg: n=2: fewer than 3 seeds: no claim can be made" in text
    assert "| dense | baseline | 2 | 3.0000 ± 0.0000 | not measured |" in text
