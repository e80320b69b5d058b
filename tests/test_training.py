"""``megatron-simreg train`` end to end on CPU: backends and parallel layouts log the same losses; bad flags.
Checkpoints and resume are in ``test_checkpointing.py``.

Each run is a subprocess (the trainer owns torch.distributed and Megatron's
global parallel state), on a tiny GPT over the cached stdlib corpus.
"""

import pytest

from trainer_utils import REG, metrics, train


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
