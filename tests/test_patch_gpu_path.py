"""The patch on the GPU code paths that no plain CPU run reaches (issue 23, items 5-8).

* CUDA graphs replay a TransformerLayer without ``nn.Module.__call__``: refused by name, and a forward whose layer
  hooks did not fire raises instead of training silently without JREG.
* A training forward without its backward (a probe, ``forward_only`` in train mode) must not leave deferred JREG
  terms for the next step's recompute.
* ``distribute_saved_activations`` (TP > 1, full recompute) shrinks a checkpointed chunk's input to a 1-D chunk.
* Block recompute with ``layer_weighted`` JREG must not keep the checkpointed layers' distance graphs until backward.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

import megatron.core  # noqa: E402,F401  (a hard import: a broken install must fail, not skip)

import megatron_simreg as ms  # noqa: E402
from megatron_utils import TINY, build_tiny_gpt, run_distributed  # noqa: E402
from test_megatron_patch import (  # noqa: E402
    FULL_UNIFORM, LM_DEFAULTS, SIMREG, _patched, assert_grads_match, assert_logged_exact, global_batch, reference,
    run_patched,
)

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo tests; CPU adaptations refuse CUDA")


def _build(**overrides):
    from megatron.core import parallel_state as ps

    return build_tiny_gpt(init_parallel=not ps.model_parallel_is_initialized(), **overrides)


def _forward(model):
    ids, labels, mask = global_batch()
    return model(ids, torch.arange(ids.shape[1]).expand_as(ids), None, labels=labels, loss_mask=mask)


# ---- 5. CUDA graphs -------------------------------------------------------------------------------------------------

class _CudaOnly(Exception):
    pass


def _cuda_graph_refusal(rank, world, regularizers, setting):
    """A CPU-built model whose config is then switched to CUDA graphs; each layer carries a graph manager that stands
    for the CUDA-only path (so reaching it is visible)."""
    from megatron_simreg.megatron import apply_to_megatron

    model, config = _build()

    def cuda_only(module, args, kwargs):
        raise _CudaOnly("the CUDA graph path ran")

    for layer in model.decoder.layers:
        layer.cudagraph_manager = cuda_only
    for name, value in setting.items():
        setattr(config, name, value)
    apply_to_megatron(**regularizers)
    model.train()
    try:
        _forward(model)
    except NotImplementedError as e:
        return "refused", str(e)
    except Exception as e:  # noqa: BLE001 - _CudaOnly, or Megatron's own CUDA-graph code failing on CPU
        return "cuda path", f"{type(e).__name__}: {e}"
    return "ran", ""


REGULARIZERS = {
    "jreg": dict(jreg=ms.JRegConfig(weighting="layer_weighted")),
    "simreg-pre_norm": dict(simreg=ms.SimRegConfig(representation="pre_norm", normalization="micro_batch")),
    "simreg-post_norm": dict(simreg=ms.SimRegConfig(normalization="micro_batch")),
}
CUDA_GRAPHS = {
    "local": dict(cuda_graph_impl="local"),
    "transformer_engine": dict(cuda_graph_impl="transformer_engine"),
    "enable_cuda_graph": dict(enable_cuda_graph=True),  # deprecated spelling, should a config skip __post_init__
}


def _cuda_graph_refusals(rank, world):
    return {(reg, graphs): _cuda_graph_refusal(rank, world, REGULARIZERS[reg], CUDA_GRAPHS[graphs])
            for reg in REGULARIZERS for graphs in CUDA_GRAPHS}


def test_cuda_graphs_are_refused_by_name_before_the_graph_path_runs():
    for case, (outcome, message) in run_distributed(_cuda_graph_refusals, 1, timeout=180)[0].items():
        assert outcome == "refused", (case, outcome, message)
        assert "--cuda-graph-impl" in message and "none" in message


def test_cuda_graphs_without_a_regularizer_are_left_alone():
    outcome, _ = run_distributed(_cuda_graph_refusal, 1, args=({}, dict(cuda_graph_impl="local")), timeout=120)[0]
    assert outcome == "cuda path"


def _hooks_bypassed(rank, world, regularizers):
    """Layers run the way a CUDA graph replays them: around nn.Module.__call__, so no hook fires
    (cuda_graph_impl left at "none", as for any path the refusal does not know)."""
    from megatron_simreg.megatron import apply_to_megatron

    model, _ = _build()
    for layer in model.decoder.layers:
        layer.cudagraph_manager = lambda module, args, kwargs: module.forward(*args, **kwargs)
    apply_to_megatron(**regularizers)
    model.train()
    try:
        _forward(model).sum().backward()
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e)
    return "ran", ""


@pytest.mark.parametrize("reg", ["jreg", "simreg-pre_norm"])
def test_forward_whose_layer_hooks_did_not_fire_raises(reg):
    kind, message = run_distributed(_hooks_bypassed, 1, args=(REGULARIZERS[reg],), timeout=120)[0]
    assert kind == "RuntimeError" and "recorded no output for decoder layer(s) [1, 2]" in message, (kind, message)
    assert "--cuda-graph-impl" in message


# ---- 6. a training forward without its backward ------------------------------------------------------------------

def _probe_then_step(rank, world, *patched_args):
    """_patched's step, preceded by a probe: a forward_only pass over other data, in train mode with autograd on."""
    import warnings

    import megatron.core.pipeline_parallel as pipeline

    real = pipeline.get_forward_backward_func

    def get_forward_backward_func():
        schedule = real()

        def probe_then_step(**kwargs):
            ids, labels, mask = global_batch()
            probe_mask = mask[:2].clone()
            probe_mask[:, :5] = 0  # a queued term carries its micro-batch's mask: the probe's differs from the step's
            probe = iter([((ids[:2].flip(0) + 3) % 8, labels[:2], probe_mask)])  # a micro-batch of other tokens
            schedule(**dict(kwargs, data_iterator=probe, num_microbatches=1, forward_only=True))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = schedule(**kwargs)
            warned.extend(str(w.message) for w in caught if "megatron-simreg" in str(w.message))
            return out

        return probe_then_step

    warned = []
    pipeline.get_forward_backward_func = get_forward_backward_func
    try:
        out = _patched(rank, world, *patched_args)
    finally:
        pipeline.get_forward_backward_func = real
    return dict(out, warned=warned)


def test_forward_without_backward_leaves_no_term_for_the_next_step():
    """Full recompute queues each checkpointed layer's JREG term for the backward's recompute; a probe's terms (no
    backward) must not be attached to the next step's recompute in place of its own."""
    ref = reference(representation="pre_norm")
    simreg_kw = dict(SIMREG, representation="pre_norm")
    overrides = dict(deallocate_pipeline_outputs=True, **FULL_UNIFORM)
    args = (1, 1, False, 1, None, simreg_kw, dict(ms.JRegConfig(weight=3.0, weighting="layer_weighted").__dict__),
            True, True, overrides)
    out = run_distributed(_probe_then_step, 1, args=args, timeout=180)[0]
    assert_grads_match(out["grads"], ref["grads"])
    assert out["queued_after_step"] == 0
    assert len(out["warned"]) == 1 and "dropped 2 queued JREG term(s)" in out["warned"][0], out["warned"]


# ---- 7. distribute_saved_activations -----------------------------------------------------------------------------

@pytest.mark.parametrize("recompute", [
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),  # layer 2's input too
    dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),  # the first layer's input
], ids=["full-uniform-1", "full-block-1"])
def test_distribute_saved_activations_is_exact(recompute):
    """TP=2 without SP: each checkpointed chunk's input is replaced by this rank's 1-D chunk after the chunk runs."""
    ref = reference(representation="pre_norm")
    outs = run_patched(tp=2, simreg_kw=dict(SIMREG, representation="pre_norm"), distribute_saved_activations=True,
                       **LM_DEFAULTS, **recompute)
    for out in outs:
        assert_grads_match(out["grads"], ref["grads"])
        assert out["queued_after_step"] == 0
    assert_logged_exact(outs[0], ref)


# ---- 8. memory held until backward -------------------------------------------------------------------------------

def retained_saved_bytes(run):
    """``tools/bench_jreg_memory.py``'s counter (the benchmark and this test measure the same thing)."""
    spec = importlib.util.spec_from_file_location("bench_jreg_memory", ROOT / "tools" / "bench_jreg_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.retained_saved_bytes(run)


def _retained_by_jreg(rank, world, weighting, dtype):
    """Bytes held for backward after one training forward with block recompute of layer 1 of 2."""
    from megatron_simreg.megatron import apply_to_megatron, undo_megatron_patch

    model, _ = _build(recompute_granularity="full", recompute_method="block", recompute_num_layers=1,
                      params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16)
    apply_to_megatron(jreg=ms.JRegConfig(weight=3.0, weighting=weighting))
    model.train()
    try:
        out, retained = retained_saved_bytes(lambda: _forward(model).float().mean())
        out.backward()
        queued = sum(len(q) for q in model._megatron_simreg_pending.values())
    finally:
        undo_megatron_patch()
    return retained, queued


def _retained_by_weighting(rank, world, dtype):
    return {w: _retained_by_jreg(rank, world, w, dtype) for w in ("layer_weighted", "final")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_block_recompute_keeps_no_jreg_graph_of_a_checkpointed_layer(dtype):
    """layer_weighted weighs both layers; layer 1 is checkpointed, so its term is attached by the backward's
    recompute and its forward distance is only logged: the forward must hold exactly what "final" (layer 2 only)
    holds."""
    out = run_distributed(_retained_by_weighting, 1, args=(dtype,), timeout=120)[0]
    (weighted, queued), (final, _) = out["layer_weighted"], out["final"]
    s_b = TINY["seq_length"] * global_batch()[0].shape[0]
    assert queued == 0
    assert weighted == final, f"layer_weighted holds {weighted - final} B more ({(weighted - final) / s_b:.0f} B/token)"
