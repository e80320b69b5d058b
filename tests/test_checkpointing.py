"""Checkpoints written by ``megatron-simreg train`` on CPU: exact resume (also at another TP size or with the
distributed optimizer), each shard once, crash-safe saves, bad or mismatched checkpoints, signals.

Each run is a subprocess (the trainer owns torch.distributed and Megatron's
global parallel state), on a tiny GPT over the cached stdlib corpus.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from trainer_utils import REG, ROOT, TINY, metrics, train


@pytest.mark.parametrize("backend", [[], ["--deepspeed", "--zero-stage", "2"]], ids=["megatron", "deepspeed"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, cache, backend):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train("--train-iters", "6", "--save", full, *REG, *backend, cache=cache)
    train("--train-iters", "6", "--save", part, "--exit-interval", "3", *REG, *backend, cache=cache)
    train("--train-iters", "6", "--save", part, "--load", part, *REG, *backend, cache=cache)
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


def assert_same_run(full, part, keys=("lm_loss", "simreg_loss", "jreg_loss", "lr", "val_loss"), rel=1e-5):
    a, b = metrics(full), metrics(part)
    assert [r["iteration"] for r in b] == [r["iteration"] for r in a]
    for ra, rb in zip(a, b, strict=True):
        for key in keys:
            if key in ra:
                assert abs(ra[key] - rb[key]) <= rel * max(1.0, abs(ra[key])), (key, ra, rb)


DIST_OPT = ["--use-distributed-optimizer", *REG]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    """The uninterrupted 4-iteration runs the resumed ones are compared with (each trained once)."""
    runs = {}

    def get(*flags):
        if flags not in runs:
            runs[flags] = str(tmp_path_factory.mktemp("full"))
            train("--train-iters", "4", "--save", runs[flags], *flags, cache=cache)
        return runs[flags]

    return get


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
def test_resume_with_the_distributed_optimizer(tmp_path, cache, uninterrupted, before, after):
    """The distributed optimizer's fp32 main params and Adam moments survive a resume, also at another DP size, in
    its default checkpoint format (Megatron-LM's "dp_reshardable": each rank's flat shards, no gather)."""
    part = str(tmp_path / "part")
    train("--train-iters", "4", "--save", part, "--exit-interval", "2", *before, *DIST_OPT, cache=cache)
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


def test_crash_mid_save_keeps_the_last_checkpoint(tmp_path, cache):
    save = str(tmp_path / "run")
    out = train("--train-iters", "4", "--save", save, "--save-interval", "2", cache=cache, expect_ok=False,
                env={"MEGATRON_SIMREG_CRASH_IN_SAVE": "4"})
    assert out.returncode != 0 and "crash injected" in out.stderr
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "2"
    assert os.path.isdir(os.path.join(save, "iter_0000004.tmp"))
    train("--train-iters", "4", "--save", save, "--load", save, cache=cache)
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "4"
    assert not os.path.exists(os.path.join(save, "iter_0000004.tmp"))
    # iterations 3-4 ran twice (before the crash, after the resume); the log keeps each once (issue 15, item 7)
    assert [r["iteration"] for r in metrics(save)] == [1, 2, 3, 4]


SAVE_FAULTS = os.path.join(ROOT, "tests", "shims", "save_faults")  # its sitecustomize injects the fault


def fault_env(fault):
    return {"MEGATRON_SIMREG_SAVE_FAULT": fault,
            "PYTHONPATH": os.pathsep.join(p for p in (SAVE_FAULTS, os.environ.get("PYTHONPATH")) if p)}


def test_a_failure_to_prepare_the_save_directory_is_one_clean_error_on_every_rank(tmp_path, cache):
    """Rank 0 makes ``iter_N.tmp`` before any rank writes; when that fails, every rank gets the same error (exit 2,
    one line), none waits in a barrier for rank 0, and the previous checkpoint stays the pointed-to one."""
    save = str(tmp_path / "run")
    out = train("--train-iters", "2", "--save", save, "--save-interval", "1", *DP2, cache=cache, expect_ok=False,
                env=fault_env("mkdir:iter_0000002.tmp"), timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "iter_0000002.tmp" in errors[0] and "Permission denied" in errors[0], errors[0]
    assert "nothing was written" in errors[0] and "iter_0000001 is intact" in errors[0], errors[0]
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "1"


def test_a_crash_between_the_renames_of_a_resave_leaves_a_resumable_pointer(tmp_path, cache):
    """Re-saving iteration 4 moves the old iter_0000004 aside, then renames the new one into place; a kill between
    the two renames leaves the pointer naming iter_0000004 while it is missing. The next run resumes it."""
    save = str(tmp_path / "run")
    run = ["--train-iters", "6", "--save", save, "--save-interval", "2"]
    train(*run, "--exit-interval", "4", cache=cache)
    out = train(*run, "--exit-interval", "4", "--load", save, "--ckpt-step", "2", cache=cache, expect_ok=False,
                env=fault_env("crash-between-renames"))
    assert out.returncode != 0 and "InjectedCrash" in out.stderr, out.stderr[-3000:]
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "4"
    assert not os.path.exists(os.path.join(save, "iter_0000004"))
    out = train(*run, "--load", save, cache=cache, expect_ok=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "restored the previous copy" in out.stdout
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "6"
    assert os.path.isfile(os.path.join(save, "iter_0000004", "meta.json"))
    assert [r["iteration"] for r in metrics(save)] == [1, 2, 3, 4, 5, 6]


def test_a_real_sigkill_of_two_processes_in_the_middle_of_a_save_resumes_to_the_same_losses(tmp_path, cache,
                                                                                              uninterrupted):
    """``kill -9`` of the launcher and both ranks (the process group, as a node failure would) while torch_dist is
    writing iteration 4's files: the pointer still names iteration 2, the next run resumes it and logs the
    uninterrupted run's losses (the same processes and kernels as assert_same_run's other users: 1e-5)."""
    save, marker = str(tmp_path / "run"), str(tmp_path / "paused")
    flags = ["--train-iters", "4", "--save", save, "--save-interval", "2", *DP2, *REG]
    cmd = [sys.executable, "-m", "megatron_simreg.cli", "train", *TINY, "--data-cache-path", cache, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **fault_env("pause-at-fsync:iter_0000004.tmp"),
           "MEGATRON_SIMREG_SAVE_FAULT_MARKER": marker}
    with open(tmp_path / "killed.log", "w") as log:  # not a pipe: nothing of the killed group may hold the test
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not os.path.exists(marker) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # every process of the run, torch_dist's writer helpers included
            proc.wait(timeout=30)
    assert os.path.exists(marker), open(tmp_path / "killed.log").read()[-3000:]
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "2"
    assert os.path.isdir(os.path.join(save, "iter_0000004.tmp"))
    train(*flags, "--load", save, cache=cache)
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "4"
    assert_same_run(uninterrupted(*DP2, *REG), save)


def test_checkpoints_without_a_pointer_are_never_overwritten(tmp_path, cache):
    """A kill between a save's rename and its pointer write leaves iter_* but no pointer (issue 15, item 4)."""
    save = tmp_path / "run"
    (save / "iter_0000002").mkdir(parents=True)
    for flags in ([], ["--fresh-start"]):
        out = train("--train-iters", "2", "--save", str(save), "--load", str(save), *flags, cache=cache,
                    expect_ok=False)
        assert out.returncode == 2 and "latest_checkpointed_iteration.txt" in out.stderr, out.stderr[-2000:]
        assert "none of them is complete" in out.stderr  # an empty iter_ dir: no meta.json
    assert sorted(os.listdir(save)) == ["iter_0000002"]


def test_unwritable_save_fails_before_training(tmp_path, cache):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = train("--train-iters", "2", "--save", str(blocker / "run"), cache=cache, expect_ok=False)
    assert out.returncode == 2 and "is not writable" in out.stderr and "iteration 1" not in out.stdout, out.stderr


def test_bad_checkpoints_are_clear_errors(tmp_path, cache):
    save = str(tmp_path / "run")
    train("--train-iters", "2", "--save", save, cache=cache)
    out = train("--train-iters", "2", "--load", save, "--hidden-size", "64", cache=cache, expect_ok=False)
    assert out.returncode != 0 and "does not match" in out.stderr and "hidden_size: checkpoint=32 run=64" in out.stderr
    with open(os.path.join(save, "iter_0000002", "__0_0.distcp"), "r+b") as f:  # a torch_dist tensor file
        f.truncate(100)
    out = train("--train-iters", "2", "--load", save, cache=cache, expect_ok=False)
    error = [line for line in out.stderr.splitlines() if "cannot read checkpoint" in line]  # one line, no traceback
    assert out.returncode == 2 and len(error) == 1 and "corrupt" in error[0] and "iter_0000002" in error[0], \
        out.stderr[-3000:]
    missing = str(tmp_path / "nothing_here")
    out = train("--train-iters", "2", "--load", missing, cache=cache, expect_ok=False)
    assert out.returncode != 0 and "no checkpoint there" in out.stderr and "--fresh-start" in out.stderr
    train("--train-iters", "2", "--load", missing, "--fresh-start", cache=cache)


def test_nan_loss_stops_and_keeps_the_checkpoint(tmp_path, cache):
    save = str(tmp_path / "run")
    out = train("--train-iters", "6", "--save", save, "--save-interval", "1", "--lr", "1e30", "--clip-grad", "0",
                cache=cache, expect_ok=False)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "(not finite)" in out.stderr
    last = int(open(os.path.join(save, "latest_checkpointed_iteration.txt")).read())
    assert os.path.isdir(os.path.join(save, f"iter_{last:07d}"))


def test_sigusr1_saves_at_the_next_step_and_exits_cleanly(tmp_path, cache):
    import signal
    import time

    save = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "megatron_simreg.cli", "train", *TINY, "--data-cache-path", cache,
           "--train-iters", "100000", "--lr-warmup-iters", "1", "--save", save]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 200
    while time.time() < deadline and not (os.path.exists(os.path.join(save, "metrics.jsonl"))
                                          and os.path.getsize(os.path.join(save, "metrics.jsonl")) > 0):
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == 0, err[-2000:]
    last = int(open(os.path.join(save, "latest_checkpointed_iteration.txt")).read())
    assert last == metrics(save)[-1]["iteration"] and last < 100000


def test_tokenizer_larger_than_the_checkpoint_vocabulary(tmp_path, cache):
    from megatron_simreg.data.default_corpus import prepare_default_corpus

    save = str(tmp_path / "run")
    train("--train-iters", "2", "--save", save, cache=cache)  # default tokenizer: 4096 tokens
    prefix, big_tokenizer = prepare_default_corpus(cache, vocab_size=8192)
    out = train("--train-iters", "4", "--load", save, "--data-path", prefix, "--tokenizer-model", big_tokenizer,
                cache=cache, expect_ok=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "the tokenizer has 8192 tokens but the model's vocabulary has only 4096" in out.stderr


@pytest.mark.parametrize("after,field", [(["--nproc-per-node", "2", "--tensor-model-parallel-size", "2"],
                                          "tensor_model_parallel_size"),
                                         (["--nproc-per-node", "2"], "data_parallel_size")], ids=["tp2", "dp2"])
def test_deepspeed_refuses_a_layout_change_on_resume(tmp_path, cache, after, field):
    """DeepSpeed's engine checkpoint is per rank and layout: a resume at another TP or DP size exits 2 before the
    model is built, naming the field and the way out (export-hf / import-hf), and writes nothing."""
    ds = ["--deepspeed", "--zero-stage", "1"]
    save = str(tmp_path / "ds")
    train("--train-iters", "4", "--exit-interval", "2", "--save", save, *ds, cache=cache)
    before = sorted(os.listdir(save))
    out = train("--train-iters", "4", "--save", save, "--load", save, *ds, *after, cache=cache, expect_ok=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert field in out.stderr and "export-hf" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert sorted(os.listdir(save)) == before
