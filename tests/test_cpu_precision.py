"""bf16 and Megatron's distributed optimizer on CPU/gloo (cpu_compat adaptations 1, 6 and 7).

Before these adaptations the trainer refused both: ``--bf16 needs CUDA`` and
``--use-distributed-optimizer needs CUDA``.
"""

import pytest
import torch

from megatron_utils import run_distributed
from trainer_utils import REAL, REG, assert_same_training, reference, train

TINY_ARGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
             "--seq-length", "32", "--micro-batch-size", "2", "--swiglu", "--lr", "3e-3", "--lr-warmup-iters", "1",
             "--train-iters", "8", "--lr-decay-style", "constant"]


def test_distributed_optimizer_trains_the_same(tmp_path, cache):  # noqa: F811
    """fp32, DP=2: exact (each rank's micro-batch gradient and their fp32 sum are the single process's); grad_norm to
    trainer_utils.F64_SUM, since the distributed optimizer cuts its float64 sum of squares differently."""
    single = reference(*REAL, *REG, cache=cache)
    multi = str(tmp_path / "multi")
    train(*REAL, "--save", multi, *REG, "--nproc-per-node", "2", "--use-distributed-optimizer", cache=cache)
    assert_same_training(single, multi, tol=0.0)


def test_bf16_distributed_optimizer_on_two_processes(tmp_path, cache):  # noqa: F811
    """bf16 trains on CPU (one process), and with the distributed optimizer on two, clipping on (--clip-grad 1.0
    against grad norms 1.7-2.1, so every step is clipped), trains bitwise the same.

    The two layouts compute the same bf16 gradients (halving is exact, and the DP sum adds the same two values),
    so the only place they can part is the clip factor max_norm / grad_norm. With megatron-core's CPU fallback norm
    (utils.local_multi_tensor_l2_norm: one fp32 torch.norm per tensor, then fp32 sums) the distributed optimizer,
    which cuts the embedding into other pieces, got a grad norm ~1e-5 off the single process's; the clipped
    gradients then differed and bf16 rounding flips grew from there (the old test allowed 1e-2 for it, blaming the
    summation order of bf16 gradients). cpu_compat adaptation 6 sums the squares in float64: the two norms differ
    by <= F64_SUM (measured 2.6e-15), far below the 2**-24 resolution of the fp32 gradients the clip factor
    multiplies, so the clipped gradients, the fp32 main params and the bf16 weights are bitwise equal: tolerance 0
    for the losses and regularizers, F64_SUM for grad_norm. On megatron's fp32 norm this comparison fails.
    """
    single = reference(*REAL, *REG, "--bf16", cache=cache)
    multi = str(tmp_path / "multi")
    train(*REAL, "--save", multi, "--bf16", *REG, "--nproc-per-node", "2", "--use-distributed-optimizer", cache=cache)
    assert_same_training(single, multi, tol=0.0)


def _bf16_steps(rank, world, distributed_optimizer):
    """Build the trainer's model and Megatron backend in bf16 and fit one fixed batch for a few steps."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_simreg.training.args import parse_train_args
    from megatron_simreg.training.backends import MegatronBackend
    from megatron_simreg.training.model_setup import build_model

    args = parse_train_args(TINY_ARGS + ["--bf16"] + (["--use-distributed-optimizer"] if distributed_optimizer else []))
    ps.initialize_model_parallel()
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(1234)
    model, config = build_model(args, 128)
    backend = MegatronBackend(args, model, config)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (4 // world, args.seq_length + 1), generator=gen)  # this rank's samples
    mb = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(tokens.shape[0], args.seq_length),
          "position_ids": torch.arange(args.seq_length).expand(tokens.shape[0], -1)}
    losses = []
    for _ in range(6):
        sums, _, applied = backend.train_step([mb])
        assert applied
        losses.append(float(sums[0] / sums[1]))
    opts = getattr(backend.optimizer, "chained_optimizers", [backend.optimizer])  # get_megatron_optimizer may chain
    groups = "shard_fp32_from_float16_groups" if distributed_optimizer else "fp32_from_float16_groups"
    main = [p for opt in opts for g in getattr(opt, groups) for p in g]
    inner = [p for opt in opts for g in opt.optimizer.param_groups for p in g["params"]]
    return {"losses": losses, "types": {type(opt).__name__ for opt in opts},
            "model_dtypes": {p.dtype for p in backend.model.module.parameters()},
            "main_dtypes": {p.dtype for p in main},
            "inner_is_main": len(inner) == len(main) and all(any(p is m for m in main) for p in inner),
            "state_dtypes": {v.dtype for opt in opts for s in opt.optimizer.state.values() for v in s.values()
                             if torch.is_tensor(v) and v.dim() > 0},
            "main_numel": sum(p.numel() for p in main),
            "model_numel": sum(p.numel() for p in backend.model.module.parameters())}


@pytest.mark.parametrize("world,distributed_optimizer", [(1, False), (2, True)],
                         ids=["float16-optimizer", "dist-opt-dp2"])
def test_bf16_params_with_fp32_main_params(world, distributed_optimizer):
    results = run_distributed(_bf16_steps, world, args=(distributed_optimizer,), timeout=240)
    for r in results:
        assert r["types"] == {"DistributedOptimizer" if distributed_optimizer else "Float16OptimizerWithFloat16Params"}
        assert r["model_dtypes"] == {torch.bfloat16}
        assert r["main_dtypes"] == {torch.float32} and r["inner_is_main"]  # AdamW steps the fp32 copies
        assert r["state_dtypes"] == {torch.float32}  # Adam moments
        losses = r["losses"]
        assert all(torch.isfinite(torch.tensor(losses))), losses
        assert losses[-1] < losses[0] - 0.1, losses  # fitting one batch
    assert results[0]["losses"] == results[-1]["losses"]  # the batch sums are global: every rank logs the same
    # each rank's fp32 main params: the whole model, or with the distributed optimizer its shard of it
    assert sum(r["main_numel"] for r in results) == results[0]["model_numel"]


def test_tensor_type_shim_is_scoped_to_the_optimizer_constructors():
    """Adaptation 7 renames CPU tensor types only inside the two constructors, and undo restores them."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    from megatron_simreg.megatron import cpu_compat

    classes = (Float16OptimizerWithFloat16Params, DistributedOptimizer)
    was_applied = cpu_compat.cpu_adaptations_applied()
    cpu_compat.undo_cpu_adaptations()
    originals = [cls.__dict__["__init__"] for cls in classes]
    seen = []
    try:
        cpu_compat.apply_cpu_adaptations()
        cpu_compat.apply_cpu_adaptations()  # idempotent: wrapped once
        for cls, orig in zip(classes, originals):
            assert cls.__init__.__wrapped__ is orig
        inner = cpu_compat._with_cuda_type_names(lambda t: seen.append(t.type()))
        outer = cpu_compat._with_cuda_type_names(
            lambda t: (inner(t), seen.append((t.type(), t.type(torch.float64).dtype))))
        outer(torch.zeros(1, dtype=torch.bfloat16))
        # nested constructors keep the CUDA name for their caller; a conversion is still a conversion
        assert seen == ["torch.cuda.BFloat16Tensor", ("torch.cuda.BFloat16Tensor", torch.float64)]
        assert torch.zeros(1).type() == "torch.FloatTensor"  # outside the constructors: the real name
    finally:
        cpu_compat.undo_cpu_adaptations()
    assert [cls.__dict__["__init__"] for cls in classes] == originals
    assert torch.Tensor.type is cpu_compat._REAL_TENSOR_TYPE
    if was_applied:
        cpu_compat.apply_cpu_adaptations()


def test_the_cpu_grad_norm_sums_in_float64_whatever_the_cut(monkeypatch):
    """cpu_compat adaptation 6: the L2 grad norm of one gradient, whole or cut into shards as the distributed
    optimizer cuts it, is the float64 norm to F64_SUM (megatron's CPU fallback, a per-tensor fp32 norm, is not)."""
    from megatron_simreg.megatron.cpu_compat import _cpu_get_grad_norm_fp64
    from trainer_utils import F64_SUM

    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *args, **kwargs: None)  # one rank
    g = torch.randn(4096 * 32, generator=torch.Generator().manual_seed(0))
    exact = g.double().norm().item()
    for pieces in ([g], list(g.split(1000)), list(g.split(4096 * 32 // 3 + 1))):
        assert abs(_cpu_get_grad_norm_fp64(pieces) - exact) <= F64_SUM * exact
    fp32 = [torch.norm(torch.tensor([torch.norm(p) for p in pieces])).item() for pieces in ([g], g.split(1000))]
    assert abs(fp32[0] - fp32[1]) > F64_SUM * exact  # what the fp32 fallback's result depends on
