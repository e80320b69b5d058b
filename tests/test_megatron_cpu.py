"""Megatron-core GPTModel on CPU/gloo: parallel layouts reproduce the serial run exactly (fp32).

Every comparison: loss and the full (unsharded) gradient of every parameter,
relative error < 1e-5.  Weights depend only on the global parameter name, so
all layouts start from identical weights.
"""

import pytest
import torch

import megatron.core  # noqa: E402,F401  (a hard import: a broken install must fail, not skip)

from megatron_utils import (  # noqa: E402
    build_tiny_gpt,
    finalize_grads_no_ddp,
    gather_full_grads,
    lm_loss,
    make_batch,
    rel_err,
    run_distributed,
)

TOL = 1e-5
BATCH = 4
TIMEOUT = 120

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU adaptations are CPU-only by design"
)


# ----------------------------------------------------------------------------
# rank functions (module level so they can be pickled for spawn)
# ----------------------------------------------------------------------------


def _tp_step(rank, world, tp, sp, num_experts, overrides):
    model, config = build_tiny_gpt(tp=tp, sp=sp, num_experts=num_experts, **overrides)
    input_ids, position_ids, labels = make_batch(BATCH)
    loss = lm_loss(model, input_ids, position_ids, labels)
    loss.backward()
    sp_flagged = sorted(n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False))
    raw = gather_full_grads(model) if sp else None  # before the SP grad all-reduce
    finalize_grads_no_ddp(model)
    return {
        "loss": loss.detach(),
        "grads": gather_full_grads(model),
        "raw_grads": raw,
        "sp_flagged": sp_flagged,
    }


def _pp_step(rank, world, pp):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model, config = build_tiny_gpt(pp=pp)
    input_ids, position_ids, labels = make_batch(BATCH)
    micro = BATCH // 2
    batches = iter(
        [
            (input_ids[i : i + micro], position_ids[i : i + micro], labels[i : i + micro])
            for i in range(0, BATCH, micro)
        ]
    )

    def loss_func(per_token_loss):
        total = per_token_loss.float().sum()
        num_tokens = torch.tensor(per_token_loss.numel(), dtype=torch.int)
        return total, num_tokens, {"lm loss": (total / num_tokens).detach()}

    def forward_step(data_iterator, model):
        ids, pos, lab = next(data_iterator)
        return model(ids, pos, None, labels=lab), loss_func

    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[model],
        num_microbatches=2,
        seq_length=input_ids.shape[1],
        micro_batch_size=micro,
        forward_only=False,
    )
    finalize_grads_no_ddp(model)
    # schedule scales each micro-batch loss by 1/num_microbatches for backward;
    # the reported per-micro-batch losses are plain means -> average them.
    loss = torch.stack([o["lm loss"] for o in out]).mean() if out else None
    return {"loss": loss, "grads": gather_full_grads(model)}


def _dp_step(rank, world, tp, sp, overrides):
    """Megatron DDP + finalize_model_grads; each DP rank gets BATCH / dp samples."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads

    model, config = build_tiny_gpt(tp=tp, sp=sp, **overrides)
    ddp_model = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
        model,
    )
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    n = BATCH // dp
    input_ids, position_ids, labels = (t[dp_rank * n : (dp_rank + 1) * n] for t in make_batch(BATCH))
    ddp_model.zero_grad_buffer()
    loss = lm_loss(ddp_model, input_ids, position_ids, labels)
    loss.backward()
    finalize_model_grads([ddp_model])  # DP all-reduce (averaging) + SP norm grads across TP
    for p in model.parameters():
        p.grad = p.main_grad
    loss_avg = loss.detach().clone()
    torch.distributed.all_reduce(loss_avg, group=parallel_state.get_data_parallel_group())
    return {"loss": loss_avg / dp, "grads": gather_full_grads(model)}


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def _assert_same(ref, results, check_loss=True):
    ref_grads = ref["grads"]
    assert len(ref_grads) > 0
    for rank, res in enumerate(results):
        if check_loss and res["loss"] is not None:
            err = rel_err(res["loss"], ref["loss"])
            assert err < TOL, f"rank {rank}: loss {res['loss']} vs {ref['loss']} (rel {err:.2e})"
        grads = res["grads"]
        assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
        for name, g_ref in ref_grads.items():
            assert g_ref.abs().sum() > 0, f"reference grad of {name} is zero"
            assert grads[name].shape == g_ref.shape, name
            err = rel_err(grads[name], g_ref)
            assert err < TOL, f"rank {rank}: grad {name} rel err {err:.2e}"


# ----------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------


def test_apply_is_idempotent_reversible_and_refused_on_gpu(monkeypatch):
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.tensor_parallel.mappings as mappings
    import megatron.core.tensor_parallel.random as tp_random
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.transformer_block as tblock

    from megatron_simreg.megatron import cpu_compat

    # Tests that build a Megatron model in this process (conversion --verify) apply the
    # adaptations; start from Megatron's originals and restore the earlier state at the end.
    was_applied = cpu_compat.cpu_adaptations_applied()
    cpu_compat.undo_cpu_adaptations()
    assert not cpu_compat.cpu_adaptations_applied()
    orig_get = tp_random._get_cuda_rng_state
    orig_fork = tp_random.CudaRNGStatesTracker.__dict__["fork"]
    orig_norm = tblock.LayerNormImpl
    had_te_gemm = hasattr(moe_utils, "te_general_gemm")
    try:
        cpu_compat.apply_cpu_adaptations()
        cpu_compat.apply_cpu_adaptations()  # idempotent
        assert cpu_compat.cpu_adaptations_applied()
        assert mappings.torch is not torch and schedules.torch is not torch
        assert mappings.torch.cuda.current_device() == torch.device("cpu")
        assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
        assert torch.cuda.current_device is not mappings.torch.cuda.current_device  # real torch untouched
        assert tp_random._get_cuda_rng_state is not orig_get
        assert tblock.LayerNormImpl is cpu_compat.CPUTorchNorm
        assert moe_utils.te_general_gemm is None
    finally:
        cpu_compat.undo_cpu_adaptations()
    assert not cpu_compat.cpu_adaptations_applied()
    assert mappings.torch is torch and schedules.torch is torch
    assert tp_random._get_cuda_rng_state is orig_get
    assert tp_random.CudaRNGStatesTracker.__dict__["fork"] is orig_fork
    assert tblock.LayerNormImpl is orig_norm
    assert hasattr(moe_utils, "te_general_gemm") == had_te_gemm

    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        with pytest.raises(RuntimeError, match="CPU-only"):
            cpu_compat.apply_cpu_adaptations()
        assert not cpu_compat.cpu_adaptations_applied()
        assert mappings.torch is torch
    if was_applied:
        cpu_compat.apply_cpu_adaptations()


def test_dense_tp2_sp_matches_tp1():
    (ref,) = run_distributed(_tp_step, 1, (1, False, None, {}), timeout=TIMEOUT)
    results = run_distributed(_tp_step, 2, (2, True, None, {}), timeout=TIMEOUT)
    _assert_same(ref, results)
    # the SP-aware norms are flagged, and their grads really need the TP all-reduce
    norms = [n for n in results[0]["sp_flagged"] if "layernorm" in n]
    assert len(norms) == 5, results[0]["sp_flagged"]
    raw = results[0]["raw_grads"]
    assert rel_err(raw["decoder.final_layernorm.weight"], ref["grads"]["decoder.final_layernorm.weight"]) > 1e-3


def test_pp2_matches_pp1():
    (ref,) = run_distributed(_pp_step, 1, (1,), timeout=TIMEOUT)
    results = run_distributed(_pp_step, 2, (2,), timeout=TIMEOUT)
    assert results[0]["loss"] is None and results[1]["loss"] is not None  # loss on last stage
    _assert_same(ref, results)


def test_moe_tp2_sp_matches_tp1():
    # aux loss on, so the router's load-balancing path (moe_utils tracker) runs too
    moe = {"moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 1e-2}
    (ref,) = run_distributed(_tp_step, 1, (1, False, 4, moe), timeout=TIMEOUT)
    results = run_distributed(_tp_step, 2, (2, True, 4, moe), timeout=TIMEOUT)
    assert any(".mlp.router.weight" in n for n in results[0]["sp_flagged"])
    _assert_same(ref, results)


def test_dp2_matches_single_process_double_batch():
    (ref,) = run_distributed(_dp_step, 1, (1, False, {}), timeout=TIMEOUT)
    results = run_distributed(_dp_step, 2, (1, False, {}), timeout=TIMEOUT)
    _assert_same(ref, results)


def test_layernorm_tp2_sp_with_ddp_finalize_model_grads_matches_tp1():
    # LayerNorm (weight + bias flagged sequence_parallel); Megatron's own
    # finalize_model_grads does the SP grad all-reduce across TP.
    ln = {"normalization": "LayerNorm"}
    (ref,) = run_distributed(_dp_step, 1, (1, False, ln), timeout=TIMEOUT)
    results = run_distributed(_dp_step, 2, (2, True, ln), timeout=TIMEOUT)
    assert "decoder.final_layernorm.bias" in ref["grads"]
    _assert_same(ref, results)
