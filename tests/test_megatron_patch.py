"""apply_to_megatron(): SimReg + JREG inside GPTModel, exact under TP+SP, PP, DP and micro-batching.

The reference is one process computing, on the whole global batch at once and
without the patch, ``LM + lambda * simreg_loss(final hidden) + alpha * jreg``
with the package's plain-PyTorch losses. Every layout, driven through
Megatron's ``get_forward_backward_func`` with the patch, must give the same
gradient for every parameter (fp32, rel err < 1e-5).
"""

import functools
import sys

import megatron.core  # noqa: F401  (a hard import: a missing or broken megatron-core fails these tests, never skips)
import pytest
import torch

import megatron_simreg as ms
from megatron_utils import TINY, build_tiny_gpt, finalize_grads_no_ddp, gather_full_grads, rel_err, run_distributed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo tests; CPU adaptations refuse CUDA")

TOL = 1e-5
BATCH, MICRO = 4, 2
SIMREG = dict(weight=0.5, temperature=0.2)
JREG = dict(weight=3.0, weighting="layer_weighted", power=1.0)


def global_batch():
    """Tokens with few distinct labels (so there are anchors) and equal masked counts per row."""
    g = torch.Generator().manual_seed(3)
    s = TINY["seq_length"]
    tokens = torch.randint(0, 8, (BATCH, s + 1), generator=g)
    mask = torch.ones(BATCH, s)
    mask[:, -3:] = 0
    mask[:, 2] = 0
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask


def _reference(rank, world, num_experts, simreg_kw, jreg_kw, representation, num_layers=TINY["num_layers"]):
    """Unpatched model, whole batch, losses written out by hand."""
    model, _ = build_tiny_gpt(num_experts=num_experts, num_layers=num_layers)
    ids, labels, mask = global_batch()
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    states, final = [], []
    layers = list(model.decoder.layers)
    layers[0].register_forward_pre_hook(lambda m, a, k: states.append(k.get("hidden_states", a[0] if a else None)),
                                        with_kwargs=True)
    for layer in layers:
        layer.register_forward_hook(lambda m, a, out: states.append(out[0] if isinstance(out, tuple) else out))
    model.decoder.register_forward_hook(lambda m, a, out: final.append(out))
    per_token = model(ids, pos, None, labels=labels)
    lm = (per_token * mask).sum() / mask.sum()
    bsh = [h.transpose(0, 1) for h in states]  # [s, b, h] -> [b, s, h]
    rep = final[0].transpose(0, 1) if representation == "post_norm" else bsh[-1]
    cfg_s, cfg_j = ms.SimRegConfig(**simreg_kw), ms.JRegConfig(**jreg_kw)
    reg_s = ms.simreg_loss(rep, labels, mask, temperature=cfg_s.temperature, chunk_size=cfg_s.chunk_size)
    d = ms.layer_angular_distances(bsh, mask, metric=cfg_j.metric)
    reg_j = ms.jreg_penalty(d, cfg_j.weighting, cfg_j.power)
    with torch.no_grad():  # what the patch logs for SimReg: the mean of the micro-batches' own SimReg means
        logged_s = {rows: torch.stack([ms.simreg_loss(rep[i:i + rows], labels[i:i + rows], mask[i:i + rows],
                                                      temperature=cfg_s.temperature, chunk_size=cfg_s.chunk_size)
                                       for i in range(0, BATCH, rows)]).mean().item()
                    for rows in (1, MICRO)}  # rows per micro-batch: MICRO, or 1 at DP=2
    (lm + cfg_s.weight * reg_s + cfg_j.weight * reg_j).backward()
    return {"lm": lm.detach(), "simreg": reg_s.detach(), "jreg": reg_j.detach(), "simreg_logged": logged_s,
            "grads": gather_full_grads(model)}


@functools.lru_cache(maxsize=None)
def reference(num_experts=None, representation="post_norm", jreg_weighting=JREG["weighting"],
              num_layers=TINY["num_layers"]):
    simreg_kw = dict(SIMREG, representation=representation)
    jreg_kw = dict(JREG, weighting=jreg_weighting)
    args = (num_experts, simreg_kw, jreg_kw, representation, num_layers)
    return run_distributed(_reference, 1, args=args, timeout=120)[0]


def _patched(rank, world, tp, pp, sp, dp, num_experts, simreg_kw, jreg_kw, per_token, use_begin_step, overrides):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_simreg.megatron import apply_to_megatron, begin_step, count_step_anchors, report_losses

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model, config = build_tiny_gpt(tp=tp, pp=pp, sp=sp, num_experts=num_experts, init_parallel=False,
                                   calculate_per_token_loss=per_token, **overrides)
    simreg_cfg = ms.SimRegConfig(**simreg_kw)
    apply_to_megatron(simreg=simreg_cfg, jreg=ms.JRegConfig(**jreg_kw))
    apply_to_megatron(simreg=simreg_cfg, jreg=ms.JRegConfig(**jreg_kw))  # idempotent

    ids, labels, mask = global_batch()
    if use_begin_step:
        begin_step(num_anchors=count_step_anchors(labels, mask, simreg_cfg), num_tokens=int(mask.sum()))
    dp_rank, per_rank = ps.get_data_parallel_rank(), BATCH // dp
    rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    ids, labels, mask = ids[rows], labels[rows], mask[rows]
    micro = per_rank // MICRO if per_rank >= MICRO else per_rank
    num_micro = per_rank // micro
    batches = iter([(ids[i:i + micro], labels[i:i + micro], mask[i:i + micro]) for i in range(0, per_rank, micro)])

    def forward_step(data_iterator, model):
        x, y, m = next(data_iterator)
        out = model(x, torch.arange(x.shape[1]).expand_as(x), None, labels=y, loss_mask=m)

        def loss_func(per_token_loss):
            total = (per_token_loss * m).sum()
            n = m.sum().to(torch.int)
            return total, n, {"lm loss": torch.stack([total.detach(), n.float()])}

        return out, loss_func

    ours = []  # all-reduces the package itself issues during the step (Megatron's own are not counted)
    all_reduce = torch.distributed.all_reduce

    def counting_all_reduce(*a, **k):
        if sys._getframe(1).f_globals.get("__name__", "").startswith("megatron_simreg"):
            ours.append(1)
        return all_reduce(*a, **k)

    torch.distributed.all_reduce = counting_all_reduce
    try:
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=batches, model=[model], num_microbatches=num_micro,
            seq_length=ids.shape[1], micro_batch_size=micro, forward_only=False,
        )
    finally:
        torch.distributed.all_reduce = all_reduce
    finalize_grads_no_ddp(model)
    dp_group = ps.get_data_parallel_group()
    for p in model.parameters():
        if p.grad is None:
            continue
        if dp > 1:  # what Megatron DDP does: average, or sum when calculate_per_token_loss
            torch.distributed.all_reduce(p.grad, group=dp_group)
            if not per_token:
                p.grad /= dp
        if per_token:  # finalize_model_grads divides by the global number of tokens
            p.grad /= global_batch()[2].sum()
    lm = None
    if ps.is_pipeline_last_stage():
        tot = torch.stack([x["lm loss"] for x in losses]).sum(0)
        if dp > 1:
            torch.distributed.all_reduce(tot, group=dp_group)
        lm = tot[0] / tot[1]
    logged = report_losses(pp_group=ps.get_pipeline_model_parallel_group(), dp_group=dp_group)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    queued = sum(len(q) for q in getattr(model, "_megatron_simreg_pending", {}).values())  # full recompute's
    return {"lm": lm, "logged": logged, "micro": micro, "grads": gather_full_grads(model), "missing_grads": missing,
            "step_all_reduces": len(ours), "queued_after_step": queued}


def run_patched(tp=1, pp=1, sp=False, dp=1, num_experts=None, simreg_kw=None, jreg_kw=None, per_token=False,
                use_begin_step=True, **overrides):
    simreg_kw = dict(SIMREG) if simreg_kw is None else simreg_kw
    jreg_kw = dict(JREG) if jreg_kw is None else jreg_kw
    args = (tp, pp, sp, dp, num_experts, simreg_kw, jreg_kw, per_token, use_begin_step, overrides)
    return run_distributed(_patched, tp * pp * dp, args=args, timeout=180)


def assert_grads_match(got, ref):
    assert got.keys() == ref.keys()
    bad = {k: rel_err(got[k], ref[k]) for k in ref if rel_err(got[k], ref[k]) > TOL}
    assert not bad, bad


# The logged values (tracker.report) are exact, not approximations of the reference's:
# * every micro-batch logs its own value, sum / count (JREG: the weighted distance sum over its valid tokens;
#   SimReg: its loss sum over its anchors, contrasted within the micro-batch), averaged over the step's micro-batches,
#   summed over pipeline stages and averaged over DP ranks. The layouts here cut the batch into micro-batches of
#   out["micro"] rows: MICRO (rows 0-1 and 2-3), or 1 at DP=2 (each DP rank's 2 rows in 2 micro-batches).
# * JREG: every row of global_batch() has the same number of valid tokens (12), so the mean of the micro-batch means is
#   the batch's mean: the logged JREG *is* the reference's jreg_penalty.
# * SimReg: the micro-batches' anchors differ in number and see only their own micro-batch's keys, so the logged value
#   is the mean of simreg_loss over the micro-batches (the reference's "simreg_logged"), not the batch's simreg_loss.
# Tolerance LOG_TOL (relative): both sides compute the same sums in fp32 (u = 2^-24 = 6e-8) from the same weights; they
# differ only in rounding: the order of ~50 summed terms (<= 50 u = 3e-6 worst case, ~sqrt(50) u = 4e-7 typical for
# the bound, far less in practice as the terms are positive and alike) and GEMMs over other batch/TP shapes, whose
# states agree to a few u. Measured: 0.0 over these tests. 1e-6 is far above that, and 1.6e4x below a 1.6e-2
# error (e.g. a 1/cp or 1/num_micro factor, or one micro-batch's value dropped, moves the value by >= 1e-2).
LOG_TOL = 1e-6


def assert_logged_exact(out, ref):
    want = {"simreg": ref["simreg_logged"][out["micro"]], "jreg": ref["jreg"].item()}
    assert out["logged"].keys() == want.keys()
    for name, value in want.items():
        assert value > 0, (name, want)
        assert abs(out["logged"][name] - value) <= LOG_TOL * value, (name, out["logged"][name], value)


@pytest.mark.parametrize("per_token", [False, True])
def test_micro_batched_single_process_equals_one_large_batch(per_token):
    ref = reference()
    out = run_patched(per_token=per_token)[0]
    assert abs(out["lm"] - ref["lm"]) <= 1e-6 * abs(ref["lm"])  # the returned LM loss is the plain LM loss
    assert_grads_match(out["grads"], ref["grads"])
    # logged values: the average of the two micro-batches' own values (see assert_logged_exact)
    assert_logged_exact(out, ref)
    assert abs(ref["simreg_logged"][MICRO] - ref["simreg"]) > 1e-3 * ref["simreg"]  # the batch's SimReg would not do


def test_pre_norm_representation():
    ref = reference(representation="pre_norm")
    out = run_patched(simreg_kw=dict(SIMREG, representation="pre_norm"))[0]
    assert_grads_match(out["grads"], ref["grads"])


def test_grad_scale_func_scales_the_regularizers_like_the_lm_loss():
    """Megatron's optimizer loss scaling (config.grad_scale_func) multiplies every gradient, the attached ones too."""
    ref = reference()
    out = run_patched(grad_scale_func=functools.partial(torch.mul, other=4.0))[0]
    assert_grads_match({k: g / 4.0 for k, g in out["grads"].items()}, ref["grads"])


def test_begin_step_keeps_host_counts_on_the_host():
    """An int count stays a Python number (a per-micro-batch host-to-device copy would sync); tensors keep theirs."""
    from megatron_simreg.megatron.step import STEP, count_factor

    ms.megatron.begin_step(num_anchors=7, num_tokens=torch.tensor(9))
    try:
        like = torch.zeros((), dtype=torch.float64)
        assert count_factor(STEP.num_anchors, like, minimum=1) == 7.0 and isinstance(STEP.num_anchors, int)
        tokens = count_factor(STEP.num_tokens, like)
        assert isinstance(tokens, torch.Tensor) and tokens.dtype == torch.float64 and tokens.item() == 9
        assert count_factor(0, like, minimum=1) == 1.0
    finally:
        ms.megatron.end_step()


def test_dense_tp2_sp():
    ref = reference()
    one = run_patched()[0]
    outs = run_patched(tp=2, sp=True)
    assert_logged_exact(one, ref)
    for out in outs:
        assert_grads_match(out["grads"], ref["grads"])
        # the logged values add up the TP shares once per step, in report_losses, to the same numbers ...
        assert_logged_exact(out, ref)
        # ... so the step itself issues no all-reduce of the package's (global_batch normalization)
        assert out["step_all_reduces"] == 0


def test_dense_pp2():
    ref = reference()
    outs = run_patched(pp=2)
    assert abs(outs[1]["lm"] - ref["lm"]) <= 1e-6 * abs(ref["lm"])
    assert_grads_match(outs[0]["grads"], ref["grads"])
    assert outs[0]["logged"] == outs[1]["logged"]  # JREG summed over stages, SimReg from the last
    assert_logged_exact(outs[0], ref)


def test_final_weighting_pp2():
    """weighting="final": only the last layer's distance is computed, so the first stage has no JREG term."""
    ref = reference(jreg_weighting="final")
    outs = run_patched(pp=2, jreg_kw=dict(JREG, weighting="final"))
    assert_grads_match(outs[0]["grads"], ref["grads"])
    assert_logged_exact(outs[0], ref)


@pytest.mark.parametrize("per_token", [False, True])
def test_dp2(per_token):
    ref = reference()
    outs = run_patched(dp=2, per_token=per_token)
    for out in outs:
        assert_grads_match(out["grads"], ref["grads"])
        assert_logged_exact(out, ref)  # each DP rank's two one-row micro-batches, averaged over DP


def test_moe_tp2_sp_matches_tp1():
    # beside the router's load-balancing and z-loss, which Megatron attaches the same way
    moe = dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)
    one = run_patched(num_experts=4, **moe)[0]
    two = run_patched(tp=2, sp=True, num_experts=4, **moe)
    assert one["missing_grads"] == [] and all(out["missing_grads"] == [] for out in two)
    for out in two:
        assert_grads_match(out["grads"], one["grads"])
    assert one["logged"]["simreg"] > 0 and one["logged"]["jreg"] > 0
    for out in two:  # the same micro-batches' values (the reference has no router losses): see LOG_TOL
        assert out["logged"].keys() == one["logged"].keys()
        for name, value in one["logged"].items():
            assert abs(out["logged"][name] - value) <= LOG_TOL * value, (name, out["logged"][name], value)


def test_micro_batch_normalization_is_the_mean_of_micro_batch_means():
    # With weight 0 for JREG, the difference between micro_batch and global_batch runs is SimReg's only.
    kw = dict(jreg_kw=dict(JREG, weight=0.0))
    mb = run_patched(simreg_kw=dict(SIMREG, normalization="micro_batch"), use_begin_step=False, **kw)[0]
    none = run_patched(simreg_kw=dict(SIMREG, weight=0.0), **kw)[0]
    ids, labels, mask = global_batch()
    # reference of the SimReg part alone: 1/2 * sum over micro-batches of their own anchor means
    ref = run_distributed(_simreg_part_mean_of_means, 1, args=(), timeout=120)[0]
    for k in ref:
        torch.testing.assert_close(mb["grads"][k] - none["grads"][k], ref[k], rtol=1e-4, atol=1e-7)


def _simreg_part_mean_of_means(rank, world):
    model, _ = build_tiny_gpt()
    ids, labels, mask = global_batch()
    final = []
    model.decoder.register_forward_hook(lambda m, a, out: final.append(out))
    total = 0.0
    for i in range(0, BATCH, MICRO):
        final.clear()
        x = ids[i:i + MICRO]
        model(x, torch.arange(x.shape[1]).expand_as(x), None)
        total = total + ms.simreg_loss(final[0].transpose(0, 1), labels[i:i + MICRO], mask[i:i + MICRO],
                                       temperature=SIMREG["temperature"])
    (SIMREG["weight"] * total / (BATCH // MICRO)).backward()
    return gather_full_grads(model)


def _needs_begin_step(rank, world):
    from megatron_simreg.megatron import apply_to_megatron, end_step

    end_step()
    model, _ = build_tiny_gpt()
    apply_to_megatron(simreg=ms.SimRegConfig())
    ids, labels, mask = global_batch()
    try:
        model(ids, torch.arange(ids.shape[1]).expand_as(ids), None, labels=labels, loss_mask=mask)
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_global_batch_without_begin_step_is_a_clear_error():
    msg = run_distributed(_needs_begin_step, 1, timeout=120)[0]
    assert "begin_step" in msg and "micro_batch" in msg


def test_patch_is_idempotent_and_reversible():
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.pipeline_parallel import schedules

    from megatron_simreg.megatron import apply_to_megatron, is_patched, undo_megatron_patch

    forward, step = GPTModel.forward, schedules.forward_step
    apply_to_megatron(simreg=ms.SimRegConfig())
    apply_to_megatron(jreg=ms.JRegConfig())
    try:
        assert is_patched()
        assert GPTModel.forward.__wrapped__ is forward and schedules.forward_step.__wrapped__ is step
    finally:
        undo_megatron_patch()
    assert GPTModel.forward is forward and schedules.forward_step is step and not is_patched()
    undo_megatron_patch()  # a second undo is a no-op
    with pytest.raises(TypeError, match="SimRegConfig"):
        apply_to_megatron(simreg={"weight": 0.1})
    assert not is_patched()


def test_unsupported_version_and_moved_symbol_are_named(monkeypatch):
    from megatron_simreg.megatron import compat

    monkeypatch.setattr(compat, "megatron_core_version", lambda: "0.15.2")
    with pytest.raises(RuntimeError, match=r"megatron-core 0.15.2 is not supported.*0.16.1 to 0.19.x"):
        ms.apply_to_megatron(simreg=ms.SimRegConfig())
    with pytest.raises(RuntimeError, match=r"needs megatron.core.models.gpt.gpt_model.GPTModelV2.*0.15.2"):
        compat.resolve("megatron.core.models.gpt.gpt_model", "GPTModelV2")


def _without_loss_mask(rank, world):
    from megatron_simreg.megatron import apply_to_megatron, begin_step, end_step
    from megatron_simreg.megatron.step import STEP

    model, _ = build_tiny_gpt()
    ids, labels, mask = global_batch()
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    simreg, jreg = ms.SimRegConfig(normalization="micro_batch", **SIMREG), ms.JRegConfig(**JREG)

    def grads(**kw):
        model.zero_grad()
        model(ids, pos, None, labels=labels, **kw).sum().backward()
        return gather_full_grads(model)

    apply_to_megatron(simreg=simreg, jreg=jreg)
    try:
        grads()
        refused = "no error"
    except ValueError as e:
        refused = str(e)
    masked = grads(loss_mask=mask)
    STEP.current_microbatch = 0
    begin_step(loss_masks=[mask])  # as the Megatron-LM adapter gives it to stages called without loss_mask
    from_step = grads()
    end_step()
    apply_to_megatron(simreg=simreg, jreg=jreg, every_token_counts=True)
    every_token = grads()
    all_ones = grads(loss_mask=torch.ones_like(mask))
    return refused, masked, from_step, every_token, all_ones


def test_a_training_forward_without_loss_mask_is_refused_unless_told_what_counts():
    """Megatron-Bridge's gpt_step never passes loss_mask; before issue 25 the patch then counted every token."""
    refused, masked, from_step, every_token, all_ones = run_distributed(_without_loss_mask, 1, timeout=120)[0]
    assert "without loss_mask" in refused and "every_token_counts=True" in refused
    assert_grads_match(from_step, masked)  # the step's mask (begin_step) is the one passed to forward
    assert_grads_match(every_token, all_ones)
    assert max(rel_err(every_token[k], masked[k]) for k in masked) > 1e-3  # the mask matters in this batch


def _packed(rank, world):
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_simreg.megatron import apply_to_megatron

    model, _ = build_tiny_gpt()
    apply_to_megatron(simreg=ms.SimRegConfig(normalization="micro_batch"))
    ids, labels, mask = global_batch()
    try:
        model(ids, torch.arange(ids.shape[1]).expand_as(ids), None, labels=labels,
              packed_seq_params=PackedSeqParams(qkv_format="thd"))
    except NotImplementedError as e:
        return str(e)
    return "no error"


def test_packed_sequences_are_refused():
    assert "packed sequences" in run_distributed(_packed, 1, timeout=120)[0]


# Operators that read a tensor's value on the host: on a GPU each one waits for the device.
HOST_SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::_unique2",
                 "aten::unique_dim", "aten::unique_consecutive", "aten::masked_select")


def _host_sync_ops(rank, world, mode):
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from torch.profiler import ProfilerActivity, profile

    from megatron_simreg.megatron import apply_to_megatron, begin_step, count_step_anchors, undo_megatron_patch

    model, _ = build_tiny_gpt()
    ids, labels, mask = global_batch()
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    simreg = ms.SimRegConfig(mode=mode)

    def step(patched):
        def forward_step(data_iterator, model):
            i = next(data_iterator)
            out = model(ids[i:i + 2], pos[i:i + 2], None, labels=labels[i:i + 2], loss_mask=mask[i:i + 2])
            return out, lambda t: (t.sum(), {})

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            if patched:  # the driver's anchor count is part of the step
                begin_step(num_anchors=count_step_anchors([labels[:2], labels[2:]], [mask[:2], mask[2:]], simreg))
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([0, 2]), model=[model],
                                        num_microbatches=2, seq_length=ids.shape[1], micro_batch_size=2,
                                        forward_only=False)
        return {e.key: e.count for e in prof.key_averages() if e.key in HOST_SYNC_OPS}

    plain = step(False)
    apply_to_megatron(simreg=simreg, jreg=ms.JRegConfig(weighting="layer_weighted"))
    try:
        return plain, step(True)
    finally:
        undo_megatron_patch()


@pytest.mark.parametrize("mode", ["exact", "shard_local"])
def test_regularized_step_adds_no_host_sync(mode):
    """On a GPU a host read of a device value stalls the launch queue; the regularizers add none to the step."""
    plain, patched = run_distributed(_host_sync_ops, 1, args=(mode,), timeout=120)[0]
    assert patched == plain


# ---- Megatron-LM's defaults: deallocate_pipeline_outputs=True, calculate_per_token_loss, activation recompute ----

LM_DEFAULTS = dict(per_token=True, deallocate_pipeline_outputs=True)


def test_pp2_with_deallocated_pipeline_outputs():
    """A non-last stage returns the attached JREG output; the schedule frees it after sending, refused for a view."""
    ref = reference()
    outs = run_patched(pp=2, **LM_DEFAULTS)
    assert abs(outs[1]["lm"] - ref["lm"]) <= 1e-6 * abs(ref["lm"])
    assert_grads_match(outs[0]["grads"], ref["grads"])
    assert_logged_exact(outs[0], ref)


def _micro_batch_per_token_under_cp(rank, world):
    """One micro-batch split over 2 CP ranks, at the level of the attached term (local attention has no CP on CPU)."""
    from types import SimpleNamespace

    from megatron.core import parallel_state as ps

    from megatron_simreg.megatron import patch, tracker

    ps.initialize_model_parallel(context_parallel_size=2)
    tokens, anchors = [(5, 3), (7, 2)][rank]  # this CP rank's valid tokens and SimReg anchors (uneven on purpose)
    s_cp, b = 8, 1
    hidden = torch.randn(s_cp, b, 4, requires_grad=True)
    mask = torch.zeros(b, s_cp)
    mask[0, :tokens] = 1
    # this rank's share of the SimReg sum is hidden.sum(), so hidden.grad is the attached term's factor
    patch.parallel_simreg_terms = lambda h, *a: SimpleNamespace(loss_sum=h.sum(), num_anchors=torch.tensor(anchors))
    patch._ACTIVE.simreg, patch._ACTIVE.jreg = ms.SimRegConfig(weight=0.5, normalization="micro_batch"), None
    model = SimpleNamespace(config=SimpleNamespace(calculate_per_token_loss=True, sequence_parallel=False),
                            post_process=True)
    cap = patch._Capture()
    cap.final = hidden
    out = torch.zeros(b, s_cp, requires_grad=True) * 1
    patch._attach(model, out, cap, torch.zeros(b, s_cp, dtype=torch.long), mask).sum().backward()
    tracker.clear()
    return hidden.grad


def test_micro_batch_per_token_scale_under_cp():
    """calculate_per_token_loss: finalize_model_grads sums the CP ranks' gradients and divides by the global token
    count, to which each CP rank adds its own tokens; the micro-batch's SimReg mean must be weighted by the tokens
    of the whole micro-batch (5 + 7), not by each CP rank's own (which is 1/cp of it on average)."""
    for grad in run_distributed(_micro_batch_per_token_under_cp, 2, timeout=120):
        torch.testing.assert_close(grad, torch.full_like(grad, 0.5 * (5 + 7) / (3 + 2)), rtol=1e-6, atol=0)


def test_combined_1f1b_schedule_is_refused():
    """overlap_moe_expert_parallel_comm runs GPTModel.build_schedule_plan, never forward: refused, not silently
    trained without the regularizers."""
    from types import SimpleNamespace

    from megatron.core.models.gpt.gpt_model import GPTModel

    from megatron_simreg.megatron import apply_to_megatron, undo_megatron_patch

    original = GPTModel.build_schedule_plan
    apply_to_megatron(jreg=ms.JRegConfig())
    try:
        with pytest.raises(NotImplementedError, match="overlap_moe_expert_parallel_comm"):
            GPTModel.build_schedule_plan(SimpleNamespace(training=True), None, None, None)
        apply_to_megatron()  # no regularizer: Megatron's own method runs
        with pytest.raises(AttributeError):
            GPTModel.build_schedule_plan(SimpleNamespace(training=True), None, None, None)
    finally:
        undo_megatron_patch()
    assert GPTModel.build_schedule_plan is original


def test_loss_tracker_stays_bounded_without_report():
    """A driver that never calls report_losses must not grow the tracker by a tensor per micro-batch."""
    from megatron_simreg.megatron import tracker
    from megatron_simreg.megatron.step import STEP

    tracker.clear()
    saved, STEP.num_microbatches = STEP.num_microbatches, 4
    try:
        for _ in range(250):  # steps without report
            for mb in range(4):
                tracker.record("jreg", torch.tensor(2.0 * (mb + 1)), torch.tensor(2.0))
        assert sum(t.numel() for t in tracker._SHARES["jreg"]) <= 4 * 2
        assert tracker.report(("jreg",))["jreg"] == pytest.approx(2.5)
        for mb in range(4):  # a step reported as usual: the mean of its micro-batch values
            tracker.record("jreg", torch.tensor(float(mb)), torch.tensor(1.0 + mb))
        assert tracker.report(("jreg",))["jreg"] == pytest.approx(sum(mb / (1 + mb) for mb in range(4)) / 4)
    finally:
        STEP.num_microbatches = saved
        tracker.clear()


def _gpu_without_te_spec(rank, world):
    """layer_spec's GPU branch without TransformerEngine, on CPU: CUDA faked while the spec is built, TE unimportable,
    and the final norm Megatron picks on such a GPU (WrappedTorchNorm) restored in place of the CPU adaptation's."""
    import dataclasses

    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import torch_norm, transformer_block
    from megatron.core.transformer.moe import moe_utils

    from megatron_simreg.megatron.model import layer_spec
    from megatron_utils import TINY, make_config

    sys.modules["transformer_engine"] = None  # import transformer_engine -> ImportError
    transformer_block.LayerNormImpl = torch_norm.WrappedTorchNorm
    del moe_utils.te_general_gemm  # left undefined by Megatron's failed TE import (the CPU adaptations define it)
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    model_parallel_cuda_manual_seed(1)
    config = make_config(tp=2, sp=True, num_experts=4)  # MoE with TP > 1 needs SP
    is_available, torch.cuda.is_available = torch.cuda.is_available, lambda: True
    try:
        spec = layer_spec(config)
    finally:
        torch.cuda.is_available = is_available

    def modules(obj):
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return [m for f in dataclasses.fields(obj) for m in modules(getattr(obj, f.name))]
        return [m for item in obj for m in modules(item)] if isinstance(obj, (list, tuple)) else [obj]

    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=TINY["vocab_size"],
                     max_sequence_length=TINY["seq_length"])
    norms = {n: p for n, p in model.named_parameters() if "norm" in n}
    return {"wrapped_in_spec": torch_norm.WrappedTorchNorm in modules(spec), "te_gemm": moe_utils.te_general_gemm,
            "sp_flagged": all(getattr(p, "sequence_parallel", False) for p in norms.values()), "norms": list(norms)}


def test_gpu_local_spec_without_te_supports_sequence_parallel():
    for out in run_distributed(_gpu_without_te_spec, 2, timeout=120):
        assert not out["wrapped_in_spec"] and out["sp_flagged"] and out["te_gemm"] is None  # MoE router's torch path
        assert "decoder.final_layernorm.weight" in out["norms"] and len(out["norms"]) == 2 * TINY["num_layers"] + 1


FULL_UNIFORM = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2)


@pytest.mark.parametrize("recompute", [
    FULL_UNIFORM,  # both layers in one checkpointed chunk: the inner layer's output exists only without autograd
    dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),  # layer 1 recomputed
    dict(recompute_granularity="selective"),  # core attention only
], ids=["full-uniform", "full-block", "selective"])
def test_activation_recompute_is_exact(recompute):
    """JREG (layer_weighted) and pre_norm SimReg read layer outputs, which full recompute computes under no_grad in
    forward and again in backward: their gradients must equal those without recompute."""
    ref = reference(representation="pre_norm")
    out = run_patched(simreg_kw=dict(SIMREG, representation="pre_norm"), **LM_DEFAULTS, **recompute)[0]
    assert_grads_match(out["grads"], ref["grads"])
    assert out["queued_after_step"] == 0
    assert_logged_exact(out, ref)  # JREG of the no_grad forward's layers included


def test_full_recompute_pp2_with_micro_batches_in_flight():
    """1F1B on 2 stages of 2 layers: the first stage runs both micro-batches' forwards before either backward."""
    ref = reference(representation="pre_norm", num_layers=4)
    outs = run_patched(pp=2, num_layers=4, simreg_kw=dict(SIMREG, representation="pre_norm"), **LM_DEFAULTS,
                       **FULL_UNIFORM)
    assert_grads_match(outs[0]["grads"], ref["grads"])
    assert [out["queued_after_step"] for out in outs] == [0, 0]
    assert outs[0]["logged"] == outs[1]["logged"]
    assert_logged_exact(outs[0], ref)
