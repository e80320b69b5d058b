"""``megatron-simreg train`` end to end on CPU: backends and parallel layouts train the same (losses, regularizers,
grad norm per iteration), a planted gradient factor is seen; bad flags.
Checkpoints and resume are in ``test_checkpointing.py``.

Each run is a subprocess (the trainer owns torch.distributed and Megatron's
global parallel state), on a tiny GPT over the cached stdlib corpus.
"""

import pytest

from trainer_utils import KEYS, REAL, REG, TINY, assert_same_training, metrics, reference, train

# Tolerances of the layout comparisons (assert_same_training: relative, per iteration, on lm_loss, simreg_loss,
# jreg_loss and the pre-clip grad_norm, over 4 updates at warmup 0).
# - Data parallelism (DDP, per-token loss, distributed optimizer) is exact in fp32: each rank's micro-batch
#   gradient is the one the single process accumulates, and the DP sum adds the same two fp32 values (a + b), so
#   EXACT = 0 (bitwise); grad_norm only to trainer_utils.F64_SUM (its float64 sum of squares is cut differently).
# - Tensor and pipeline parallelism reorder fp32 sums. TP splits each row-parallel matmul's K = 32-term
#   contraction (hidden 32, and 2 x 16 heads' channels) into two partial sums added afterwards; PP sums the tied
#   embedding's gradient as (in_1 + in_2) + (out_1 + out_2) across the stages instead of per micro-batch, and the
#   logged per-stage JREG terms across stages. A reordered sum of K O(1) fp32 terms differs by up to
#   K * 2**-24 = 1.9e-6 relative; each logged value goes through ~4 such sums in a chain (2 layers, forward and
#   backward), so REORDER_TOL = 4 * K * 2**-24 = 7.6e-6, rounded up to 1e-5. Measured (grad norm in float64), over
#   3 iterations: TP=2 with SP at most 2.2e-6 (jreg_loss) and 8.7e-7 (grad_norm); PP=2 3.8e-7 (jreg_loss),
#   1.2e-7 (lm_loss), 4.8e-8 (grad_norm); DeepSpeed ZeRO-1 TP=2 with SP 9.7e-7 (jreg_loss), 8.0e-7 (grad_norm);
#   over 4 iterations, Qwen attention at TP=2 7.5e-7 (jreg_loss), MoE at TP=2 with SP 1.2e-6 (jreg_loss),
#   3.2e-7 (grad_norm), 1.2e-7 (moe_aux_loss).
# - DeepSpeed computes its own (fp32) grad norm; ZeRO-2 at DP=2 matches ZeRO-1 on one process bitwise.
# - Combined layouts (4 processes). Data parallelism adds no rounding, so TP2 x DP2 and PP2 x DP2 keep REORDER_TOL, and
#   MoE at TP2 x DP2 with SP that of MoE at TP2 with SP. TP2 x PP2 chains both dimensions' reordered sums: TP's 4 and
#   PP's 2 (the tied embedding's gradient, the per-stage JREG terms), 6 * K * 2**-24 = 1.1e-5, so COMBINED_TOL =
#   1.2e-5. Measured over 4 iterations: TP2 x DP2 (distributed optimizer) 2.2e-6 (simreg_loss), 1.4e-6 (grad_norm);
#   TP2 x PP2 with SP 8.1e-7 (jreg_loss), 4.3e-8 (grad_norm); PP2 x DP2 (distributed optimizer) 4.7e-7 (jreg_loss);
#   MoE TP2 x DP2 with SP 1.2e-6 (jreg_loss), 3.2e-7 (grad_norm). Each fails on a planted bug of its kind at
#   iteration 1's grad_norm: a 1/DP factor (scale_grads.py) on TP2 x DP2 (50%); the tied embedding's gradient not
#   summed over the stages (SIMREG_PLANT_SKIP=embedding, tests/shims/skip_finalize_step.py) on TP2 x PP2 and
#   PP2 x DP2 (8.2%); the SP norm and router gradients not summed over TP (SIMREG_PLANT_SKIP=tp) on TP2 x PP2 and
#   MoE (1.1e-4 and 1.2e-4: caught with a margin of 9x over these tolerances).
# A planted 2x or 1/DP gradient factor changes grad_norm by 100% / 50% at iteration 1 (and, with Adam and
# clipping at 1.0 against norms 1.7-2.1, the losses by only ~1e-6): see test_the_comparison_sees_a_gradient_factor.
EXACT = 0.0
REORDER_TOL = 1e-5
DP2 = ["--nproc-per-node", "2"]
DS1 = ["--deepspeed", "--zero-stage", "1"]
DP4, TP2 = ["--nproc-per-node", "4"], ["--tensor-model-parallel-size", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]
COMBINED_TOL = 1.2e-5
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01"]
LAYER_WEIGHTED = ["--jreg-weighting", "layer_weighted"]  # every pipeline stage has a JREG term


@pytest.mark.parametrize("layout,ref_flags,tol", [
    ([*DP2, "--tensor-model-parallel-size", "2", "--sequence-parallel", *DS1], DS1, REORDER_TOL),
    ([*DP2, "--deepspeed", "--zero-stage", "2"], DS1, EXACT),
    ([*DP2, "--tensor-model-parallel-size", "2", "--sequence-parallel"], [], REORDER_TOL),
    ([*DP2, "--pipeline-model-parallel-size", "2", *LAYER_WEIGHTED], LAYER_WEIGHTED, REORDER_TOL),
    ([*DP2, "--calculate-per-token-loss"], [], EXACT),
    # combined layouts, 4 processes
    ([*DP4, *TP2, "--use-distributed-optimizer"], [], REORDER_TOL),
    ([*DP4, *TP2, *PP2, "--sequence-parallel", *LAYER_WEIGHTED], LAYER_WEIGHTED, COMBINED_TOL),
    ([*DP4, *PP2, "--use-distributed-optimizer", *LAYER_WEIGHTED], LAYER_WEIGHTED, REORDER_TOL),
    ([*DP4, *TP2, "--sequence-parallel", "--use-distributed-optimizer", *MOE], MOE, REORDER_TOL),
], ids=["ds-zero1-tp2-sp", "ds-zero2-dp2", "megatron-tp2-sp", "megatron-pp2", "megatron-dp2-per-token",
        "megatron-tp2-dp2-distopt", "megatron-tp2-pp2-sp", "megatron-pp2-dp2-distopt", "moe-tp2-sp-dp2-distopt"])
def test_parallel_layouts_train_the_same(tmp_path, cache, layout, ref_flags, tol):
    single = reference(*REAL, *REG, *ref_flags, cache=cache)
    multi = str(tmp_path / "multi")
    train(*REAL, "--save", multi, *REG, *layout, cache=cache)
    assert_same_training(single, multi, tol, keys=(*KEYS, "moe_aux_loss") if MOE[0] in layout else KEYS)


@pytest.mark.parametrize("factor", ["2", "1/dp"])
def test_the_comparison_sees_a_gradient_factor(tmp_path, cache, factor):
    """The harness sees a data-parallel scale bug: every gradient of a DP=2 run multiplied by 2 (a sum instead of
    a mean) or by 1/DP (a mean taken twice) before the optimizer step (tests/shims/scale_grads.py) must fail."""
    single = reference(*REAL, *REG, cache=cache)
    bad = str(tmp_path / "bad")
    train(*REAL, "--save", bad, *REG, *DP2, shim="scale_grads.py", env={"SIMREG_PLANT_GRAD_FACTOR": factor},
          cache=cache)
    with pytest.raises(AssertionError, match="iteration 1 grad_norm") as failure:
        assert_same_training(single, bad, EXACT)
    print(failure.value)
    first_ref, first_bad = metrics(single)[0], metrics(bad)[0]
    assert first_bad["lm_loss"] == first_ref["lm_loss"]  # the same forward; only the gradient is scaled
    assert first_bad["grad_norm"] == pytest.approx(first_ref["grad_norm"] * {"2": 2, "1/dp": 0.5}[factor], rel=1e-12)


@pytest.mark.parametrize("backend", [[], DS1], ids=["megatron", "deepspeed"])
def test_qwen_attention_under_tp2_trains_the_same(tmp_path, cache, backend):
    """QKV biases (split with their rows) and QK-norm (each TP rank normalizes its own heads with the shared
    weights, whose gradients must be summed over TP, as finalize_model_grads does) at TP=2, no SP, equal TP=1."""
    qwen = [*REAL, "--add-qkv-bias", "--qk-layernorm", "--kv-channels", "16", *REG, *backend]
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    train("--save", single, *qwen, cache=cache)
    train("--save", multi, *DP2, "--tensor-model-parallel-size", "2", *qwen, cache=cache)
    assert_same_training(single, multi, REORDER_TOL)


@pytest.mark.parametrize("backend", [[], DS1], ids=["megatron", "deepspeed"])
def test_moe_tp2_sp_trains_the_same(tmp_path, cache, backend):
    single, multi = reference(*REAL, *REG, *MOE, *backend, cache=cache), str(tmp_path / "multi")
    train(*REAL, "--save", multi, *REG, *MOE, *backend, *DP2, *TP2, "--sequence-parallel", cache=cache)
    assert_same_training(single, multi, REORDER_TOL, keys=(*KEYS, "moe_aux_loss"))


@pytest.mark.parametrize("flags,message", [
    (["--hidden-size", "30"], "divisible by --num-attention-heads"),
    (["--num-experts", "4", "--tensor-model-parallel-size", "2"], "needs --sequence-parallel"),
    (["--deepspeed", "--pipeline-model-parallel-size", "2"], "not supported"),
    (["--save-interval", "2"], "needs --save"),
    (["--reset-attention-mask", "--context-parallel-size", "2"], "--reset-attention-mask with --context-parallel"),
])
def test_bad_flags(capsys, flags, message):
    """Refused while the flags are parsed (in-process: the same parser the CLI runs; one end-to-end case below)."""
    from megatron_simreg.training.args import parse_train_args

    with pytest.raises(SystemExit) as exit_:
        parse_train_args([*TINY, "--train-iters", "2", *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_missing_data_is_one_error_line(cache):
    out = train("--train-iters", "2", "--data-path", "/nonexistent/prefix", "--tokenizer-model", "/nonexistent.model",
                cache=cache, expect_ok=False, timeout=200)
    assert out.returncode == 2 and "nonexistent" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


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
