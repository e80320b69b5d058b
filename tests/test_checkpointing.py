"""Checkpoints written by ``megatron-simreg train`` on CPU: exact resume (also at another TP or DP size, with the
distributed optimizer, and DeepSpeed ZeRO's partitioned state), each shard once; DeepSpeed's refusal of a layout
change. Crash-safe saves, bad or mismatched checkpoints and signals are in ``test_checkpoint_safety.py``.

Each run is a subprocess (the trainer owns torch.distributed and Megatron's
global parallel state), on a tiny GPT over the cached stdlib corpus.
"""

import os

import pytest
import torch

from trainer_utils import REG, assert_same_run, metrics, train


def test_resume_reproduces_the_uninterrupted_run(tmp_path, cache):
    """Megatron's backend, one process (DeepSpeed's resume, with ZeRO's partitioned state on two ranks:
    test_deepspeed_zero_resumes_its_partitioned_state_across_two_ranks)."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train("--train-iters", "6", "--save", full, *REG, cache=cache)
    train("--train-iters", "6", "--save", part, "--exit-interval", "3", *REG, cache=cache)
    train("--train-iters", "6", "--save", part, "--load", part, *REG, cache=cache)
    a, b = metrics(full), metrics(part)
    assert [r["iteration"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b, strict=True):
        for key in ("lm_loss", "simreg_loss", "jreg_loss", "lr", "val_loss"):
            if key in ra:
                assert abs(ra[key] - rb[key]) <= 1e-6 * max(1.0, abs(ra[key])), (key, ra, rb)
    record = a[-1]
    for key in ("iteration", "consumed_tokens", "lm_loss", "simreg_loss", "jreg_loss", "lr", "grad_norm",
                "tokens_per_sec", "tflops", "mem_gb", "val_loss"):
        assert key in record


TP2 = ["--nproc-per-node", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel"]


DIST_OPT = ["--use-distributed-optimizer", *REG]


FULLY_RESHARDABLE = ["--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable"]


def content_metadata(save, iteration):
    """The content metadata a Megatron checkpoint records (dist_checkpointing's, in its common.pt)."""
    return torch.load(os.path.join(save, f"iter_{iteration:07d}", "common.pt"), weights_only=False)["content_metadata"]


@pytest.mark.parametrize("before,after,optim", [(TP2, [], []), ([], TP2, []), (TP2, [], FULLY_RESHARDABLE)],
                         ids=["tp2-to-tp1", "tp1-to-tp2", "tp2-to-tp1-distributed-optimizer"])
def test_resume_at_another_tensor_parallel_size(tmp_path, cache, uninterrupted, before, after, optim):
    """dist_checkpointing reshards on load: a run saved at one TP size continues at another as if uninterrupted
    (with the distributed optimizer, when it saved with --dist-ckpt-optim-fully-reshardable)."""
    part = str(tmp_path / "part")
    train("--train-iters", "4", "--save", part, "--exit-interval", "2", *REG, *optim, *before, cache=cache)
    if optim:
        assert content_metadata(part, 2)["distrib_optim_sharding_type"] == "fully_reshardable"
    train("--train-iters", "4", "--save", part, "--load", part, *REG, *optim, *after, cache=cache)
    assert_same_run(uninterrupted(*REG, *optim), part)


DP2 = ["--nproc-per-node", "2"]


@pytest.mark.parametrize("before,after", [(DP2, DP2), (DP2, []), ([], DP2)], ids=["dp2", "dp2-to-dp1", "dp1-to-dp2"])
def test_resume_with_the_distributed_optimizer(cache, uninterrupted, interrupted, before, after):
    """The distributed optimizer's fp32 main params and Adam moments survive a resume, also at another DP size, in
    its default checkpoint format (Megatron-LM's "dp_reshardable": each rank's flat shards, no gather)."""
    part = interrupted(*before, *DIST_OPT)
    assert content_metadata(part, 2)["distrib_optim_sharding_type"] == "dp_reshardable"
    train("--train-iters", "4", "--save", part, "--load", part, *after, *DIST_OPT, cache=cache)
    assert_same_run(uninterrupted("--nproc-per-node", "2", *DIST_OPT), part)


def test_another_tp_size_from_dp_reshardable_optimizer_state_is_refused(tmp_path, cache):
    """The default ("dp_reshardable") distributed-optimizer state is laid out per TP/PP rank: a resume at another
    TP size is refused before the model is built, naming the save flag that allows it and --no-load-optim."""
    part = str(tmp_path / "part")
    train("--train-iters", "4", "--save", part, "--exit-interval", "2", *TP2, *DIST_OPT, cache=cache)
    out = train("--train-iters", "4", "--save", part, "--load", part, *DIST_OPT, cache=cache, expect_ok=False)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    for needed in ("dp_reshardable", "TP=2, PP=1", "TP=1, PP=1", "--dist-ckpt-optim-fully-reshardable",
                   "--no-load-optim"):
        assert needed in errors[0], (needed, errors[0])
    # the advice: the weights alone resume at TP=1
    train("--train-iters", "4", "--save", part, "--load", part, "--no-load-optim", *DIST_OPT, cache=cache)
    assert [r["iteration"] for r in metrics(part)] == [1, 2, 3, 4]


@pytest.mark.parametrize("stage", ["1", "2"], ids=["zero1", "zero2"])
def test_deepspeed_zero_resumes_its_partitioned_state_across_two_ranks(tmp_path, cache, uninterrupted, stage):
    """ZeRO-1/2 partition the Adam state over the data-parallel ranks: each rank's partition must come back. The same
    two processes run the same kernels on the same data as the uninterrupted run, so the resumed losses and gradient
    norms equal it bitwise (warmup 0: every iteration updates)."""
    ds = ("--deepspeed", "--zero-stage", stage, *DP2, *REG, "--lr-warmup-iters", "0")
    part = str(tmp_path / "part")
    train("--train-iters", "4", "--save", part, "--exit-interval", "2", *ds, cache=cache)
    train("--train-iters", "4", "--save", part, "--load", part, *ds, cache=cache)
    assert_same_run(uninterrupted(*ds), part, keys=("lm_loss", "simreg_loss", "jreg_loss", "grad_norm", "lr"), rel=0)


def test_a_checkpoint_holds_each_shard_once(tmp_path, cache):
    """Data-parallel replicas are not written once per rank: DP=2 writes what DP=1 writes."""
    def size(save):
        d = os.path.join(save, "iter_0000001")
        return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f != "meta.json")

    one, two = str(tmp_path / "dp1"), str(tmp_path / "dp2")
    train("--train-iters", "1", "--lr-warmup-iters", "0", "--save", one, cache=cache)
    train("--train-iters", "1", "--lr-warmup-iters", "0", "--save", two, "--nproc-per-node", "2", cache=cache)
    assert abs(size(two) - size(one)) <= 0.1 * size(one), (size(one), size(two))


def test_no_load_optim_keeps_the_loaded_weights_in_bf16(tmp_path, cache):
    """`--load --no-load-optim` in bf16: the optimizer's fp32 main params are refreshed from the loaded model.

    With lr=0 a step leaves the weights as loaded, so the validation loss after
    the resumed run's first step equals the saved run's last one; stale main
    params (the random init) would be copied over the loaded model instead.
    """
    save, cont = str(tmp_path / "run"), str(tmp_path / "cont")
    evals = ["--bf16", "--eval-interval", "1", "--eval-iters", "1"]
    train("--train-iters", "2", "--save", save, *evals, cache=cache)
    train("--train-iters", "3", "--save", cont, "--load", save, "--no-load-optim", "--lr", "0", *evals, cache=cache)
    assert metrics(cont)[0]["iteration"] == 3
    assert metrics(cont)[0]["val_loss"] == metrics(save)[-1]["val_loss"], (metrics(save), metrics(cont))


@pytest.mark.parametrize("after,field", [(["--nproc-per-node", "2", "--tensor-model-parallel-size", "2"],
                                          "tensor_model_parallel_size"),
                                         (["--nproc-per-node", "2"], "data_parallel_size")], ids=["tp2", "dp2"])
def test_deepspeed_refuses_a_layout_change_on_resume(cache, interrupted, after, field):
    """DeepSpeed's engine checkpoint is per rank and layout: a resume at another TP or DP size exits 2 before the
    model is built, naming the field and the way out (export-hf / import-hf), and writes nothing."""
    ds = ["--deepspeed", "--zero-stage", "1"]
    save = interrupted(*ds)
    before = sorted(os.listdir(save))
    out = train("--train-iters", "4", "--save", save, "--load", save, *ds, *after, cache=cache, expect_ok=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert field in out.stderr and "export-hf" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert sorted(os.listdir(save)) == before
