"""`megatron-simreg compare`: grid checks, tokens-to-target and seed statistics on synthetic curves, the
report, a reduced tiny grid end to end (train, skip when finished, resume when interrupted), SLURM dry run."""

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from megatron_simreg.compare import report, runner, summary
from megatron_simreg.compare.grid import GridError, load_grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

TRAIN = {"num-layers": 2, "hidden-size": 32, "num-attention-heads": 4, "num-query-groups": 2, "seq-length": 64,
         "swiglu": True, "micro-batch-size": 4, "global-batch-size": 4, "lr": 3e-3, "lr-warmup-iters": 2,
         "eval-interval": 4, "eval-iters": 1, "log-interval": 4}


def grid_yaml(tmp_path, name="grid.yaml", **over):
    g = {"train": dict(TRAIN), "data": {"train-iters": 12}, "models": {"dense": {}},
         "methods": {"baseline": {}, "simreg": {"simreg-weight": 0.1}}, "seeds": [1, 2]}
    g.update(over)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(g, sort_keys=False))
    return str(path)


def cli(*argv, timeout=900):
    return subprocess.run([sys.executable, "-m", "megatron_simreg.cli", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=ENV)


# ----------------------------------------------------------------------------- the grid


def test_grid_expands_seed_major_with_shared_flags(tmp_path):
    g = load_grid(grid_yaml(tmp_path, data={"tokens": 1000}, methods={
        "baseline": {}, "simreg": {"simreg-weight": 0.1}, "jreg": {"jreg-weight": 3.0}}))
    assert [r.name for r in g.runs] == ["dense.baseline.s1", "dense.simreg.s1", "dense.jreg.s1",
                                        "dense.baseline.s2", "dense.simreg.s2", "dense.jreg.s2"]
    r = g.run("dense", "jreg", 2)
    assert r.train_iters == math.ceil(1000 / (4 * 64)) and r.tokens_per_iter == 256
    argv = " ".join(r.train_argv)
    # A regularizer a method does not set is off, whatever a shared config says.
    assert "--jreg-weight 3.0" in argv and "--simreg-weight 0" in argv and "--seed 2" in argv
    base, sim = g.run("dense", "baseline", 1).train_argv, g.run("dense", "simreg", 1).train_argv
    assert [a for a in sim if a not in base] == ["0.1"]  # only the method's value differs within a seed


@pytest.mark.parametrize("over, message", [
    ({"modelz": {}}, "unknown keys ['modelz']"),
    ({"methods": {"simreg": {"simreg-weight": 0.1}}}, "a method named `baseline` is required"),
    ({"methods": {"baseline": {"simreg-weight": 0.1}}}, "trains without SimReg and JREG"),
    ({"models": {"dense": {"seed": 3}}}, "are set by compare"),
    ({"models": {"dense": {"num-layerz": 3}}}, "the trainer rejects these flags"),
    ({"models": {"d.v2": {}}}, "may only use letters"),
    ({"models": {}}, "name at least one"),
    ({"data": {"tokens": 100, "train-iters": 3}}, "exactly one of `tokens`"),
    ({"seeds": [1, 1]}, "repeats a seed"),
    ({"seeds": "1"}, "non-empty list of integers"),
    ({"train": {**TRAIN, "eval-interval": None}}, "no eval-interval"),
    ({"train": {**TRAIN, "global-batch-size": None}}, "set `global-batch-size`"),
    ({"evaluation": {"zero-shot": {"tasks": "hellaswag"}}}, "must be a list"),
    ({"evaluation": {"analysis": {"sequences": -1}}}, "expected an integer >= 0"),
])
def test_malformed_grids_are_refused_with_the_fix(tmp_path, over, message):
    with pytest.raises(GridError, match=None) as e:
        load_grid(grid_yaml(tmp_path, **over))
    assert message in str(e.value)


def test_missing_or_non_yaml_grid(tmp_path):
    with pytest.raises(GridError, match="no such file"):
        load_grid(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(GridError, match="not valid YAML"):
        load_grid(str(bad))
    out = cli("compare", "--grid", str(bad), "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "compare: error" in out.stderr


# ----------------------------------------------------------------------------- statistics and report


def _analysis(intra, jump):
    return {"layer_distances": [0.1, 0.1 * jump], "jump_strength": jump, "intra_cos": intra, "inter_cos": 0.1,
            "margin_mean": -1.0, "margin_median": -1.0, "margin_frac_positive": 0.25,
            "margin_hist": {"edges": [-2.0, 0.0, 2.0], "counts": [0, 3, 1, 0]}}


def test_summary_pairs_seeds_and_never_divides_by_zero(tmp_path):
    g = load_grid(grid_yaml(tmp_path, methods={"baseline": {}, "simreg": {"simreg-weight": 0.1},
                                               "jreg": {"jreg-weight": 1.0}}))
    t = [100, 200, 300, 400]
    curves = {  # simreg crosses each seed's (smoothed) target; jreg never reaches it
        "dense.baseline.s1": [4.0, 3.0, 2.5, 2.0], "dense.simreg.s1": [3.5, 2.5, 2.0, 1.8],
        "dense.jreg.s1": [4.0, 3.5, 3.0, 2.9],
        "dense.baseline.s2": [4.0, 3.0, 2.6, 2.2], "dense.simreg.s2": [3.0, 2.2, 2.0, 1.9],
        "dense.jreg.s2": [4.0, 3.5, 3.0, 2.9]}
    evals = {k: {"iteration": 12, "tokens": t, "val_loss": v,
                 "zero_shot": {"task_a": {"value": 0.5 if "baseline" in k else 0.6}},
                 "analysis": _analysis(0.3 if "simreg" in k else 0.2, 2.0)} for k, v in curves.items()}
    runs = summary.per_run(g, evals)
    # Curves smoothed over 3 evaluations (2 at the ends). Seed 1: target (2.5 + 2.0) / 2 = 2.25, which the
    # baseline's smoothed curve reaches at 400; simreg's, (3.5 + 2.5 + 2.0) / 3 at 200 and 2.1 at 300, between.
    t1 = 200 + 100 * (8 / 3 - 2.25) / (8 / 3 - 2.1)
    assert runs["dense.simreg.s1"]["target"] == pytest.approx(2.25)
    assert runs["dense.simreg.s1"]["baseline_tokens_to_target"] == pytest.approx(400.0)
    assert runs["dense.simreg.s1"]["tokens_to_target"] == pytest.approx(t1)
    assert runs["dense.simreg.s1"]["speedup"] == pytest.approx(1 - t1 / 400)
    # seed 2: target (2.6 + 2.2) / 2 = 2.4, simreg's smoothed curve is (3.0 + 2.2 + 2.0) / 3 = 2.4 at 200
    assert runs["dense.simreg.s2"]["tokens_to_target"] == pytest.approx(200.0)
    assert runs["dense.simreg.s2"]["speedup"] == pytest.approx(0.5)
    assert runs["dense.jreg.s1"]["tokens_to_target"] is None and runs["dense.jreg.s1"]["speedup"] is None
    agg = summary.summarize(g, runs)["dense"]
    speedups = [1 - t1 / 400, 0.5]
    assert agg["simreg"]["speedup"]["mean"] == pytest.approx(sum(speedups) / 2)
    assert agg["simreg"]["speedup"]["std"] == pytest.approx(abs(speedups[0] - speedups[1]) / math.sqrt(2))
    assert agg["jreg"]["reached"] == 0 and agg["jreg"]["speedup"] == {"mean": None, "std": None, "n": 0}
    assert agg["simreg"]["zero_shot"]["task_a"]["mean"] == pytest.approx(0.6)
    assert agg["simreg"]["analysis"]["inter_intra_gap"]["mean"] == pytest.approx(0.2)
    assert agg["simreg"]["analysis"]["margin_hist"]["counts"] == [0, 6, 2, 0]
    assert agg["baseline"]["curve"]["mean"][1] == pytest.approx(3.0) and agg["baseline"]["curve"]["std"][3] > 0

    # the legend says over how many seeds a speed-up was averaged, and shows none below 3 (issue 26 item 8)
    assert report.legend_label("simreg", agg["simreg"]) == "simreg (2 of 2 seeds reached the target)"
    assert report.legend_label("jreg", agg["jreg"]) == "jreg (0 of 2 seeds reached the target)"
    three = {**agg["simreg"], "seeds": [1, 2, 3, 4], "reached": 3}
    assert report.legend_label("simreg", three) == (
        f"simreg (speed-up {report._ms(agg['simreg']['speedup'], '{:+.1f}', pct=True)}, 3 of 4 seeds)")
    assert report.legend_label("baseline", agg["baseline"]) == "baseline"

    out = tmp_path / "out"
    out.mkdir()
    report.write_results(str(out), g, runs, summary.summarize(g, runs), [])
    report.write_plots(str(out), summary.summarize(g, runs))
    text = open(report.write_report(str(out), g, summary.summarize(g, runs), [])).read()
    assert "| dense | simreg | 2 | 1.8500 ± 0.0707 | not measured | 237 ± 52 | 2/2 | +40.8% ± 13.0% |" in text
    assert "| dense | jreg | 2 |" in text and "| 0/2 | – |" in text
    for png in ("val_loss_dense.png", "layer_distance_dense.png", "margins_dense.png"):
        assert (out / png).stat().st_size > 1000 and f"({png})" in text
    assert json.load(open(out / "results.json"))["summary"]["dense"]["simreg"]["reached"] == 2


def test_mean_std_ignores_missing_values():
    assert summary.mean_std([1.0, None, float("nan"), 3.0]) == {"mean": 2.0, "std": math.sqrt(2.0), "n": 2}
    assert summary.mean_std([5.0]) == {"mean": 5.0, "std": None, "n": 1}


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    """The reduced tiny grid: dense, baseline vs SimReg, two seeds, with zero-shot and hidden-state analysis."""
    d = tmp_path_factory.mktemp("compare")
    cache = str(d / "cache")
    path = grid_yaml(d, train={**TRAIN, "eval-iters": 2}, data={"train-iters": 12, "data-cache-path": cache},
                     evaluation={"zero-shot": {"tasks": ["pycode_next_line"], "limit": 16, "batch-size": 16},
                                 "analysis": {"sequences": 4}})
    out = cli("compare", "--grid", path, "--out", str(d / "out"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return d, path, out


def test_tiny_grid_end_to_end(tiny_grid):
    d, _, out = tiny_grid
    res = json.load(open(d / "out" / "results.json"))
    assert res["unfinished_runs"] == [] and len(res["runs"]) == 4
    agg = res["summary"]["dense"]
    assert agg["baseline"]["final_val_loss"]["n"] == 2 and agg["baseline"]["final_val_loss"]["std"] is not None
    for name, r in res["runs"].items():
        assert r["tokens"] == [1024, 2048, 3072] and len(r["val_loss"]) == 3  # evaluations at 4, 8, 12
        assert 0.0 <= r["zero_shot"]["pycode_next_line"] <= 1.0
        an = r["analysis"]
        assert len(an["layer_distances"]) == 2 and an["jump_strength"] > 0
        assert -1.0 <= an["inter_cos"] <= 1.0 and -1.0 <= an["intra_cos"] <= 1.0
        assert (d / "out" / "runs" / name / "hf" / "config.json").is_file()
    for seed in (1, 2):  # the paired difference's validation noise, from the final evaluation's 2 batches each
        run, base = (json.load(open(d / "out" / "runs" / f"dense.{m}.s{seed}" / "eval.json"))
                     for m in ("simreg", "baseline"))
        assert len(run["final_val_batches"]["losses"]) == len(base["final_val_batches"]["losses"]) == 2
        assert run["final_val_batches"]["sha256"] == base["final_val_batches"]["sha256"]  # the same batches
        se = res["runs"][f"dense.simreg.s{seed}"]["final_loss_diff_se"]
        assert se > 0 and se == pytest.approx(summary.difference_se(run["final_val_batches"],
                                                                    base["final_val_batches"]))
    seeds = [json.load(open(d / "out" / "runs" / f"dense.baseline.s{s}" / "eval.json")) for s in (1, 2)]
    assert summary.difference_se(seeds[0]["final_val_batches"], seeds[1]["final_val_batches"]) is None  # not paired
    text = (d / "out" / "report.md").read_text()
    for section in ("## Convergence", "## Zero-shot accuracy", "## Representations", "## Layer jumps"):
        assert section in text
    assert "| dense | simreg | 2 |" in out.stdout  # the convergence table is printed too


def test_rerun_skips_finished_runs_and_reuses_their_evaluation(tiny_grid):
    d, path, _ = tiny_grid
    before = (d / "out" / "runs" / "dense.simreg.s2" / "eval.json").stat().st_mtime
    out = cli("compare", "--grid", path, "--out", str(d / "out"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("finished (iteration 12), skipped") == 4
    assert (d / "out" / "runs" / "dense.simreg.s2" / "eval.json").stat().st_mtime == before


def test_interrupted_run_resumes_and_matches_the_uninterrupted_one(tiny_grid, tmp_path):
    d, path, _ = tiny_grid
    grid = yaml.safe_load(open(path))
    grid.update(seeds=[1], methods={"baseline": {}}, evaluation={"analysis": {"sequences": 0}})
    small = tmp_path / "one.yaml"
    small.write_text(yaml.safe_dump(grid, sort_keys=False))
    out_dir = str(tmp_path / "out")
    run = load_grid(str(small)).runs[0]
    runner.record_flags(out_dir, run)
    # The run as compare starts it, stopped after iteration 4 (a crash or preemption after a checkpoint).
    first = subprocess.run(runner.train_command(out_dir, run) + ["--exit-interval", "4"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env=ENV)
    assert first.returncode == 0, first.stderr[-2000:]
    assert runner.state(out_dir, run) == ("interrupted", 4)
    out = cli("compare", "--grid", str(small), "--out", out_dir)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "resuming from iteration 4 of 12" in out.stdout
    resumed = json.load(open(os.path.join(out_dir, "results.json")))["runs"]["dense.baseline.s1"]
    whole = json.load(open(d / "out" / "results.json"))["runs"]["dense.baseline.s1"]
    assert resumed["tokens"] == whole["tokens"]
    assert resumed["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-6, abs=1e-6)

    # The same directory with a changed grid is refused, not silently mixed.
    grid["train"]["lr"] = 1e-3
    small.write_text(yaml.safe_dump(grid, sort_keys=False))
    out = cli("compare", "--grid", str(small), "--out", out_dir)
    assert out.returncode == 1 and "started with other flags" in out.stderr


def test_slurm_dry_run_is_one_job_array(tmp_path):
    out = cli("compare", "--grid", grid_yaml(tmp_path), "--out", str(tmp_path / "o"), "--slurm", "--dry-run",
              "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "04:00:00")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "#SBATCH --array=0-3" in out.stdout and "#SBATCH --nodes=2" in out.stdout
    for name in ("dense.baseline.s1", "dense.simreg.s2"):
        assert name in out.stdout
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_example_grids_are_valid():
    tiny = load_grid(os.path.join(ROOT, "examples", "compare_tiny.yaml"))
    assert len(tiny.runs) == 2 * 4 * 3 and tiny.zero_shot_tasks
    sweep = load_grid(os.path.join(ROOT, "examples", "compare_sweep.yaml"))
    assert sweep.sweeps and len(sweep.runs) == len(sweep.methods) * len(sweep.models) * len(sweep.seeds)
    gpu = load_grid(os.path.join(ROOT, "examples", "compare_dense_moe_gpu.yaml"))
    assert {r.model for r in gpu.runs} == {"gpt-125m", "gpt-350m", "gpt-1p3b", "moe-8x"} and len(gpu.runs) == 48
    # per-model budgets: 2.5 B tokens of 256 x 2048 per iteration
    assert gpu.run("gpt-125m", "simreg", 3).train_iters == math.ceil(2.5e9 / (256 * 2048))
