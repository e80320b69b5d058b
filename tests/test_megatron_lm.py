"""SimReg and JREG in Megatron-LM's own ``pretrain()`` loop, through ``examples/pretrain_gpt_simreg.py``.

Megatron-LM's unmodified ``pretrain_gpt.py`` (core_v0.16.1: ``../shared/megatron-lm-core_v0.16.1``, or
``MEGATRON_LM_PATH``) runs on CPU with gloo under the test-only shims of ``tests/megatron_lm_cpu.py``, on
a small indexed corpus written by the test, with ``--eod-mask-loss`` (so loss masks are not all ones) and Megatron's
null tokenizer.
``tests/megatron_lm_record.py`` records what ``training_log`` gets and, in one process, checks each step's gradient
against the objective written out by hand.

Tolerances (relative):

* HAND_TOL = 1e-5, the hand check (the whole gradient vector, L2, and the logged values). Both sides compute the
  same fp32 (u = 2**-24 = 6e-8) sums in other orders and shapes: the patch's blockwise SimReg against the naive
  [b, s, s] one, its angular distance from another formula, and Megatron's per-micro-batch loss scaling against the
  one written out; each of the ~4 chained reductions of K <= 32 terms reorders to K u = 1.9e-6, so 4 K u = 7.6e-6,
  rounded up to 1e-5 (the same bound as tests/test_training.py's REORDER_TOL). Measured: at most 1.5e-7 (gradient)
  and 2.1e-7 (logged values) over 16 checked steps.
* LAYOUT_TOL = 1e-5, DP2, TP2 with SP and PP2 against one process at the same weights and batch: the bound of
  tests/test_training.py's REORDER_TOL, derived there for these very reorderings (TP's split contractions, PP's tied
  embedding sum and per-stage JREG terms); DP adds no rounding. Measured: at most 9e-8. Seen failing on planted
  bugs: the anchor count not summed over DP (DP2, grad_norm 34%), every token counted where Megatron-LM gives no
  loss_mask (TP2 x PP2, 1.1e-3).
* A resume through Megatron-LM's checkpointing is bitwise (0): the same kernels on bitwise-equal states.

A planted 10% error in SimReg's coefficient (``tests/shims/plant_simreg_coefficient.py``) moves the gradient by
far more than HAND_TOL: see ``test_a_wrong_coefficient_is_seen``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_simreg.megatron.compat import megatron_core_version
from megatron_simreg.parallel.process import free_port

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "megatron-lm-core_v0.16.1"
MEGATRON_LM = os.environ.get("MEGATRON_LM_PATH") or (str(FIXTURE) if FIXTURE.is_dir() else None)
LAUNCHER = ROOT / "examples" / "pretrain_gpt_simreg.py"

pytestmark = [
    pytest.mark.skipif(MEGATRON_LM is None, reason=f"Megatron-LM not found: neither {FIXTURE} nor "
                                                   "MEGATRON_LM_PATH is there"),
    pytest.mark.skipif(not megatron_core_version().startswith("0.16."),
                       reason=f"Megatron-LM's loop is tested at core_v0.16.x; megatron-core is "
                              f"{megatron_core_version()}"),
]

HAND_TOL = 1e-5
LAYOUT_TOL = 1e-5

MODEL = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--max-position-embeddings", "32", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
         "--swiglu", "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0"]
CPU = ["--transformer-impl", "local", "--use-cpu-initialization", "--distributed-backend", "gloo",
       "--no-gradient-accumulation-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
       "--no-masked-softmax-fusion", "--no-rope-fusion", "--no-persist-layer-norm"]
VOCAB = 128  # NullTokenizer: ids 0..127, EOD = 128
DATA = ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB), "--eod-mask-loss", "--split", "100,0,0",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--seed", "1234"]
# warmup 0 and a constant rate: every checked iteration is a real update; no clipping (the pre-clip norm is checked)
TRAIN = ["--lr", "1e-3", "--lr-warmup-iters", "0", "--lr-decay-style", "constant", "--clip-grad", "1e6",
         "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000"]
# layer_weighted: every pipeline stage has JREG terms, so PP2's first stage needs the loss masks the adapter gives it
REG = ["--simreg-weight", "0.5", "--simreg-temperature", "0.2", "--jreg-weight", "3.0",
       "--jreg-weighting", "layer_weighted"]
LOGGED = ("lm loss", "simreg loss", "jreg loss")
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-token-dispatcher-type", "allgather"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Short documents over 12 token ids, each ending in EOD, in megatron-core's indexed format: sequences pack
    several documents (so labels repeat: SimReg has anchors), and --eod-mask-loss masks the EOD labels."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path_factory.mktemp("mlm_corpus") / "corpus")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(200):
        doc = np.append(rng.integers(0, 12, int(rng.integers(4, 24))), VOCAB).astype(np.int32)
        builder.add_document(doc, [len(doc)])  # a numpy array: no torch __array__ copy warning
    builder.finalize(prefix + ".idx")
    return prefix


def run(out: Path, corpus: str, *flags: str, nproc: int = 1, hand_check: bool = False, script: Path = LAUNCHER,
        timeout: int = 300, env: dict | None = None) -> list:
    """Train on ``corpus`` with Megatron-LM's pretrain_gpt.py through ``script``; returns the recorded iterations."""
    out.mkdir(parents=True, exist_ok=True)
    record = out / "record.jsonl"
    record.unlink(missing_ok=True)
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGATRON_LM_PATH": MEGATRON_LM, "SIMREG_MLM_RECORD": str(record),
               "SIMREG_MLM_HAND_CHECK": "1" if hand_check else "0",
               "PYTHONPATH": os.pathsep.join([MEGATRON_LM, str(ROOT), os.environ.get("PYTHONPATH", "")]),
               **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(ROOT / "tests" / "megatron_lm_record.py"), str(script), *MODEL, *CPU, "--data-path", corpus, *DATA,
           *TRAIN, *flags]
    proc = subprocess.run(cmd, env=run_env, cwd=out, capture_output=True, text=True, timeout=timeout)
    (out / "stdout.txt").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}"
    return [json.loads(line) for line in record.read_text().splitlines()]


def assert_hand_check(records, tol=HAND_TOL):
    for r in records:
        assert r["hand_grad_rel_err"] <= tol, (r["iteration"], r["hand_grad_rel_err"])
        assert abs(r["grad_norm"] - r["hand_grad_norm"]) <= tol * r["hand_grad_norm"], r
        for key in LOGGED:
            want = r["hand_" + key.replace(" ", "_")]
            assert abs(r[key] - want) <= tol * abs(want), (r["iteration"], key, r[key], want)


def assert_same(ref: dict, got: dict, tol: float, keys=(*LOGGED, "grad_norm")):
    assert ref["iteration"] == got["iteration"], (ref, got)
    for key in keys:
        diff = abs(ref[key] - got[key])
        assert diff <= tol * abs(ref[key]), (f"iteration {ref['iteration']} {key}: {ref[key]!r} vs {got[key]!r}, "
                                             f"relative difference {diff / abs(ref[key]):.3g} > {tol:g}")


@pytest.fixture(scope="module")
def single(tmp_path_factory, corpus):
    """One process, 3 iterations, every step checked by hand, a checkpoint after each."""
    out = tmp_path_factory.mktemp("mlm_single")
    records = run(out, corpus, *REG, "--train-iters", "3", "--save", str(out / "ckpt"), "--save-interval", "1",
                  "--tensorboard-dir", str(out / "tb"), hand_check=True)
    return out, records


def test_one_process_trains_the_hand_written_objective(single):
    out, records = single
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert_hand_check(records)
    assert all(r["simreg loss"] > 0 and r["jreg loss"] > 0 for r in records)


def test_the_values_are_in_the_log_line_and_tensorboard(single):
    out, records = single
    lines = [ln for ln in (out / "stdout.txt").read_text().splitlines() if " iteration " in ln and "lm loss:" in ln]
    assert len(lines) == 3 and all("simreg loss:" in ln and "jreg loss:" in ln for ln in lines), lines[-1:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb")).Reload()
    for key in LOGGED:
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2, 3]
        for s, r in zip(scalars, records):
            assert abs(s.value - r[key]) <= 1e-6 * abs(r[key]), (key, s.value, r[key])


# Two options per run (each pair is independent: the loss convention and recompute; the expert layers and the MTP
# head), halving the runs; a failing pair is split by hand.
@pytest.mark.parametrize("flags", [
    ["--calculate-per-token-loss",
     "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    [*MOE, "--mtp-num-layers", "1"],
], ids=["per-token-full-recompute", "moe-mtp"])
def test_megatron_lm_options_train_the_hand_written_objective(tmp_path, corpus, flags):
    records = run(tmp_path, corpus, *REG, *flags, "--train-iters", "2", hand_check=True)
    assert [r["iteration"] for r in records] == [1, 2]
    assert_hand_check(records)


@pytest.mark.parametrize("flags", [
    ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    ["--pipeline-model-parallel-size", "2"],
    ["--use-distributed-optimizer"],
    ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel"],
], ids=["tp2-sp", "pp2", "dp2-distopt", "tp2-pp2-sp"])
def test_parallel_layouts_match_one_process(single, corpus, tmp_path, flags):
    """From the one-process run's iteration-1 checkpoint, iteration 2 at another layout: same weights, same batch.

    TP2 x PP2 is where Megatron-LM calls the first stage's TP rank 1 without loss_mask (get_batch_on_this_tp_rank
    broadcasts it to the last stage only): there JREG needs the adapter's masks. Counting every token instead
    (``--reg-every-token-counts``, the patch's behaviour before issue 25) moved iteration 2's grad_norm by 1.1e-3 and
    jreg loss by 2.0e-4, 20x and more over LAYOUT_TOL (measured by hand)."""
    out, records = single
    nproc = 4 if "--pipeline-model-parallel-size" in flags and "--tensor-model-parallel-size" in flags else 2
    got = run(tmp_path, corpus, *REG, *flags, "--train-iters", "2", "--load", str(out / "ckpt"), "--ckpt-step", "1",
              "--no-load-optim", "--no-load-rng", "--exit-on-missing-checkpoint", nproc=nproc)
    assert [r["iteration"] for r in got] == [2]
    assert_same(records[1], got[0], LAYOUT_TOL)


def test_document_scope_trains_the_hand_written_objective_and_matches_across_dp(corpus, tmp_path):
    """--simreg-scope document: one process against the per-document objective written out by hand, then DP2 with
    the distributed optimizer (the anchor count per document, summed over DP) from its iteration-1 checkpoint."""
    flags = [*REG, "--simreg-scope", "document", "--train-iters", "2"]
    one = run(tmp_path / "one", corpus, *flags, "--save", str(tmp_path / "ckpt"), "--save-interval", "1",
              hand_check=True)
    assert_hand_check(one)
    dp2 = run(tmp_path / "dp2", corpus, *flags, "--use-distributed-optimizer", "--load", str(tmp_path / "ckpt"),
              "--ckpt-step", "1", "--no-load-optim", "--no-load-rng", "--exit-on-missing-checkpoint", nproc=2)
    assert_same(one[1], dp2[0], LAYOUT_TOL)


def test_a_resume_through_megatron_lm_checkpointing_continues_bitwise(single, corpus, tmp_path):
    out, records = single
    got = run(tmp_path, corpus, *REG, "--train-iters", "3", "--load", str(out / "ckpt"), "--ckpt-step", "2",
              "--exit-on-missing-checkpoint")
    assert [r["iteration"] for r in got] == [3]
    assert_same(records[2], got[0], 0.0, keys=(*LOGGED, "grad_norm", "lr"))


def test_a_wrong_coefficient_is_seen(tmp_path, corpus):
    """The hand check sees SimReg's lambda off by 10% in the adapter (a planted bug)."""
    records = run(tmp_path, corpus, *REG, "--train-iters", "1", hand_check=True,
                  script=ROOT / "tests" / "shims" / "plant_simreg_coefficient.py")
    assert records[0]["hand_grad_rel_err"] > 100 * HAND_TOL, records[0]


def _args(**over):
    """Megatron-LM's args as the adapter reads them: our flags' defaults plus the few Megatron-LM settings it checks."""
    import argparse

    from megatron_simreg.megatron_lm import add_arguments

    args = add_arguments(argparse.ArgumentParser()).parse_args(REG)
    for name, value in {"virtual_pipeline_model_parallel_size": None, "hybrid_context_parallel": False,
                        "use_legacy_models": False, "cuda_graph_impl": "none", **over}.items():
        setattr(args, name, value)
    return args


@pytest.mark.parametrize("setting,named", [
    ({"virtual_pipeline_model_parallel_size": 2}, "--num-layers-per-virtual-pipeline-stage"),
    ({"hybrid_context_parallel": True}, "--hybrid-context-parallel"),
    ({"cuda_graph_impl": "local"}, "--cuda-graph-impl none"),
    ({"use_legacy_models": True}, "--use-legacy-models"),
])
def test_what_cannot_work_is_refused_by_name(setting, named):
    from megatron_simreg.megatron_lm import check_supported

    check_supported(_args())
    with pytest.raises(NotImplementedError, match=named):
        check_supported(_args(**setting))


def test_bad_regularizer_flags_name_the_flag():
    from megatron_simreg.megatron_lm import configs_from_args

    with pytest.raises(ValueError, match=r"--simreg-\*.*temperature"):
        configs_from_args(_args(simreg_temperature=0.0))
    assert configs_from_args(_args(simreg_weight=0.0, jreg_weight=0.0)) == (None, None)


def test_the_launcher_says_where_megatron_lm_is_missing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MEGATRON_LM_PATH", "PYTHONPATH")}
    missing = subprocess.run([sys.executable, str(LAUNCHER)], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode != 0 and "set MEGATRON_LM_PATH" in missing.stderr, missing.stderr[-2000:]
    wrong = subprocess.run([sys.executable, str(LAUNCHER)], env={**env, "MEGATRON_LM_PATH": str(tmp_path)},
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0 and "is not a Megatron-LM checkout" in wrong.stderr, wrong.stderr[-2000:]


def test_install_is_idempotent_and_reversible():
    code = """
import megatron.training, megatron.training.training as t
from megatron_simreg import megatron_lm as a
pretrain, step = t.pretrain, t.train_step
a.install(); a.install()
assert t.pretrain.__wrapped__ is pretrain and t.train_step.__wrapped__ is step, "wrapped twice"
assert megatron.training.pretrain is t.pretrain
a.uninstall()
assert t.pretrain is pretrain and t.train_step is step and megatron.training.pretrain is pretrain
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([MEGATRON_LM, str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_bench_megatron_lm_runs(cache, tmp_path):
    """The benchmark's plumbing (numbers are measured by hand: docs/performance.md)."""
    env = {**os.environ, "MEGATRON_LM_PATH": MEGATRON_LM, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_megatron_lm.py"), "--preset", "cpu-test",
                          "--iters", "3", "--warmup", "1", "--data-cache-path", cache,
                          "--variants", "Megatron-LM", "megatron-simreg train + both"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| Megatron-LM |") or "train + both" in ln]
    assert len(rows) == 2 and "1.000x" in rows[0], out.stdout
