"""``megatron-simreg train`` end to end on CPU: backends, layouts, exact resume, crash-safe saves, bad input.

Each run is a subprocess (the trainer owns torch.distributed and Megatron's
global parallel state), on a tiny GPT over the cached stdlib corpus.
"""

import os
import subprocess
import sys

import pytest

from trainer_utils import REG, ROOT, TINY, metrics, train


@pytest.mark.parametrize("backend", [[], ["--deepspeed", "--zero-stage", "2"]], ids=["megatron", "deepspeed"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, cache, backend):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train("--train-iters", "6", "--save", full, *REG, *backend, cache=cache)
    train("--train-iters", "6", "--save", part, "--exit-interval", "3", *REG, *backend, cache=cache)
    train("--train-iters", "6", "--save", part, "--load", part, *REG, *backend, cache=cache)
    a, b = metrics(full), metrics(part)
    assert [r["iteration"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("lm_loss", "simreg_loss", "jreg_loss", "lr", "val_loss"):
            if key in ra:
                assert abs(ra[key] - rb[key]) <= 1e-6 * max(1.0, abs(ra[key])), (key, ra, rb)
    record = a[-1]
    for key in ("iteration", "consumed_tokens", "lm_loss", "simreg_loss", "jreg_loss", "lr", "grad_norm",
                "tokens_per_sec", "tflops", "mem_gb", "val_loss"):
        assert key in record


@pytest.mark.parametrize("layout", [
    ["--nproc-per-node", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel", "--deepspeed",
     "--zero-stage", "1"],
    ["--nproc-per-node", "2", "--deepspeed", "--zero-stage", "2"],
    ["--nproc-per-node", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
    ["--nproc-per-node", "2", "--pipeline-model-parallel-size", "2", "--jreg-weighting", "layer_weighted"],
    ["--nproc-per-node", "2", "--calculate-per-token-loss"],
], ids=["ds-zero1-tp2-sp", "ds-zero2-dp2", "megatron-tp2-sp", "megatron-pp2", "megatron-dp2-per-token"])
def test_parallel_layouts_log_the_same_losses(tmp_path, cache, layout):
    single = str(tmp_path / "single")
    ds = ["--deepspeed", "--zero-stage", "1"] if "--deepspeed" in layout else []
    weighting = layout[layout.index("--jreg-weighting"):][:2] if "--jreg-weighting" in layout else []
    train("--train-iters", "3", "--save", single, *REG, *ds, *weighting, cache=cache)
    multi = str(tmp_path / "multi")
    train("--train-iters", "3", "--save", multi, *REG, *layout, cache=cache)
    for ra, rb in zip(metrics(single), metrics(multi)):
        for key in ("lm_loss", "simreg_loss", "jreg_loss"):
            assert abs(ra[key] - rb[key]) <= 2e-5 * abs(ra[key]), (key, ra, rb)


@pytest.mark.parametrize("backend", [[], ["--deepspeed", "--zero-stage", "1"]], ids=["megatron", "deepspeed"])
def test_qwen_attention_under_tp2_logs_the_same_losses(tmp_path, cache, backend):
    """QKV biases (split with their rows) and QK-norm (each TP rank normalizes its own heads with the shared
    weights, whose gradients must be summed over TP, as finalize_model_grads does) at TP=2, no SP, equal TP=1."""
    qwen = ["--add-qkv-bias", "--qk-layernorm", "--kv-channels", "16", *REG, *backend]
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    train("--train-iters", "3", "--save", single, *qwen, cache=cache)
    train("--train-iters", "3", "--save", multi, "--nproc-per-node", "2", "--tensor-model-parallel-size", "2", *qwen,
          cache=cache)
    for ra, rb in zip(metrics(single), metrics(multi), strict=True):
        for key in ("lm_loss", "simreg_loss", "jreg_loss"):
            assert abs(ra[key] - rb[key]) <= 2e-5 * abs(ra[key]), (key, ra, rb)


@pytest.mark.parametrize("backend", [[], ["--deepspeed", "--zero-stage", "1"]], ids=["megatron", "deepspeed"])
def test_moe_tp2_sp_logs_the_same_losses(tmp_path, cache, backend):
    moe = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01", *REG, *backend]
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    train("--train-iters", "2", "--save", single, *moe, cache=cache)
    train("--train-iters", "2", "--save", multi, "--nproc-per-node", "2", "--tensor-model-parallel-size", "2",
          "--sequence-parallel", *moe, cache=cache)
    for ra, rb in zip(metrics(single), metrics(multi)):
        for key in ("lm_loss", "simreg_loss", "jreg_loss", "moe_aux_loss"):
            assert abs(ra[key] - rb[key]) <= 2e-5 * max(abs(ra[key]), 1e-3), (key, ra, rb)


TP2 = ["--nproc-per-node", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel"]


def assert_same_run(full, part, keys=("lm_loss", "simreg_loss", "jreg_loss", "lr", "val_loss"), rel=1e-5):
    a, b = metrics(full), metrics(part)
    assert [r["iteration"] for r in b] == [r["iteration"] for r in a]
    for ra, rb in zip(a, b):
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


@pytest.mark.parametrize("before,after", [(TP2, []), ([], TP2)], ids=["tp2-to-tp1", "tp1-to-tp2"])
def test_resume_at_another_tensor_parallel_size(tmp_path, cache, uninterrupted, before, after):
    """dist_checkpointing reshards on load: a run saved at one TP size continues at another as if uninterrupted."""
    part = str(tmp_path / "part")
    train("--train-iters", "4", "--save", part, "--exit-interval", "2", *REG, *before, cache=cache)
    train("--train-iters", "4", "--save", part, "--load", part, *REG, *after, cache=cache)
    assert_same_run(uninterrupted(*REG), part)


@pytest.mark.parametrize("after", [["--nproc-per-node", "2"], []], ids=["dp2", "dp2-to-dp1"])
def test_resume_with_the_distributed_optimizer(tmp_path, cache, uninterrupted, after):
    """The distributed optimizer's fp32 main params and Adam moments survive a resume (also at another DP size)."""
    part = str(tmp_path / "part")
    train("--train-iters", "4", "--save", part, "--exit-interval", "2", "--nproc-per-node", "2", *DIST_OPT,
          cache=cache)
    train("--train-iters", "4", "--save", part, "--load", part, *after, *DIST_OPT, cache=cache)
    assert_same_run(uninterrupted("--nproc-per-node", "2", *DIST_OPT), part)


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


@pytest.mark.parametrize("flags,message", [
    (["--hidden-size", "30"], "divisible by --num-attention-heads"),
    (["--num-experts", "4", "--tensor-model-parallel-size", "2"], "needs --sequence-parallel"),
    (["--deepspeed", "--pipeline-model-parallel-size", "2"], "not supported"),
    (["--data-path", "/nonexistent/prefix", "--tokenizer-model", "/nonexistent.model"], "nonexistent"),
    (["--save-interval", "2"], "needs --save"),
])
def test_bad_flags(cache, flags, message):
    out = train("--train-iters", "2", *flags, cache=cache, expect_ok=False, timeout=200)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]


def test_config_file_and_flag_precedence(tmp_path, cache):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num-layers: 2\nhidden-size: 64\ntrain-iters: 1\n")
    from megatron_simreg.training.args import parse_train_args

    args = parse_train_args(["--config", str(cfg), "--hidden-size", "32"])
    assert args.num_layers == 2 and args.hidden_size == 32 and args.train_iters == 1
    cfg.write_text("hidden_sizes: 64\n")
    with pytest.raises(SystemExit):
        parse_train_args(["--config", str(cfg)])


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


def test_comm_device_follows_the_backend(monkeypatch):
    import torch
    import torch.distributed as dist

    from megatron_simreg.parallel.comm import comm_device

    assert comm_device() == torch.device("cpu")  # not initialized
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert comm_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert comm_device() == torch.device("cpu")


def test_host_values_are_reduced_on_the_comm_device(monkeypatch):
    """NCCL reduces CUDA tensors only: the trainer's sums, stop flag and logged values travel on comm_device().

    comm_device() is made to answer "meta", which no value starts on, and each
    all-reduce records its tensor's device and stops the function there.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_simreg.megatron import tracker
    from megatron_simreg.training import backends, signals, trainer

    class Reached(Exception):
        pass

    seen = []

    def all_reduce(t, *args, **kwargs):
        seen.append(t.device.type)
        raise Reached

    meta = lambda group=None: torch.device("meta")  # noqa: E731
    for module in (trainer, signals, backends, tracker):
        monkeypatch.setattr(module, "comm_device", meta)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(ps, "get_pipeline_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(ps, "get_pipeline_model_parallel_group", lambda: None)
    calls = [
        lambda: trainer._all_sum([1, 2]),
        signals.signal_received,
        lambda: backends._global_sums(torch.zeros(2)),
    ]
    for groups in [("tp",), ()]:  # the shares' reduce over TP/CP, then (no such groups) the pipeline's
        calls.append(lambda groups=groups: (tracker.record("simreg", torch.tensor(1.0), torch.tensor(2.0), groups),
                                            tracker.report(pp_group="pp")))
    for call in calls:
        with pytest.raises(Reached):
            call()
        tracker.clear()
    assert seen == ["meta"] * len(calls)
