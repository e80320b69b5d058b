"""``apply_to_megatron()``: SimReg and JREG inside Megatron-core's GPTModel.

After the call, every ``GPTModel`` (dense or MoE, local or TransformerEngine
spec) in training mode adds ``lambda * L_SimReg`` and ``alpha * R_JREG`` to the
gradient through :class:`.step.RegLossAutoScaler`, while the per-token LM
loss it returns is unchanged: no fork of Megatron, no change to the training
loop. The style follows Liger-Kernel's Megatron patch: idempotent, a marker
attribute, ``__wrapped__`` on every replaced function, and
:func:`undo_megatron_patch` restores the originals.

What is read, and where:

* JREG: forward hooks on ``decoder.layers[i]`` (installed on a model's first
  training forward) record the first local layer's input and every local
  layer's output ``[s_local, b, h]``. Each pipeline stage penalizes its own
  layers, weighted by their global ``layer_number``, and attaches its part.
* Full activation recompute (``recompute_granularity="full"``) runs the
  checkpointed layers without autograd in forward and again, with autograd,
  in backward. Their JREG values are logged in forward, and each one's term
  is queued on its layer (FIFO: micro-batches go backward in forward order)
  and attached to the layer's output when the backward recomputes it, with
  the layer's recomputed input: the same gradient as without recompute.
  A training forward whose backward never runs (a probe, ``forward_only``
  in train mode, a step abandoned by an in-process restart) would leave its
  terms queued for the next step's recompute: the queues of a model chunk are
  emptied at its first micro-batch of each step (``schedules.forward_step``
  with ``current_microbatch == 0``), with a warning when terms were dropped.
  A checkpointed layer's logged distance is computed in its forward hook,
  under ``no_grad``, from its input before ``distribute_saved_activations``
  shrinks that to a 1-D chunk, and holds no autograd graph until backward.
  SimReg reads the last layer's output (``pre_norm``) or the final norm's,
  which autograd reaches from outside the checkpoint. Selective recompute
  is inside the layers and changes nothing here.
* SimReg: on the last stage, the decoder's output (the final norm's output,
  ``representation="post_norm"``) or the last layer's output (``"pre_norm"``),
  with the ``labels`` and ``loss_mask`` passed to ``GPTModel.forward``. With
  MTP, the decoder output is the main model's only; MTP runs later.
* Valid tokens are ``loss_mask == 1``: pass ``loss_mask`` to
  ``GPTModel.forward`` so that both terms see the LM loss's tokens. A
  training forward without one takes the step's mask from
  :func:`.step.begin_step` (``loss_masks``; the Megatron-LM adapter gives
  them: Megatron-LM calls middle pipeline stages, and the first stage's
  tensor-parallel ranks other than 0, without it), or counts every token when ``apply_to_megatron(...,
  every_token_counts=True)`` says so, and is refused otherwise: a driver
  that never passes it (Megatron-Bridge's ``gpt_step``) would silently make
  prompt and padding tokens anchors.
* ``schedules.forward_step`` is wrapped to record the number of micro-batches
  and the fp16 loss scale, exactly what Megatron records for its MoE loss.
* CUDA graphs (``config.cuda_graph_impl`` other than ``"none"``, Megatron-LM's
  ``--cuda-graph-impl``) replay a ``TransformerLayer`` without
  ``nn.Module.__call__``, so its hooks never fire: refused while a regularizer
  is on. A training forward that records fewer layers than the chunk holds
  (hooks bypassed some other way) raises instead of training without JREG.
* ``GPTModel.build_schedule_plan`` (the combined 1F1B schedule of
  ``overlap_moe_expert_parallel_comm``, which never calls ``forward``) is
  wrapped to refuse training while a regularizer is on, instead of silently
  training without it.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch

from ..config import JRegConfig, SimRegConfig
from ..losses.jreg import layer_distance_sums, layer_weights, token_distances
from ..parallel.simreg_parallel import ShardLayout, parallel_simreg_terms
from . import compat, tracker
from .step import STEP, RegLossAutoScaler, count_factor, loss_scale, wrap_forward_step

MARKER = "_megatron_simreg_patched"


@dataclass
class _Active:
    simreg: Optional[SimRegConfig]
    jreg: Optional[JRegConfig]
    every_token_counts: bool = False


_ACTIVE = _Active(None, None)


def apply_to_megatron(simreg: Optional[SimRegConfig] = None, jreg: Optional[JRegConfig] = None, *,
                      every_token_counts: bool = False) -> None:
    """Patch Megatron-core so that GPTModel trains with SimReg and/or JREG.

    Idempotent: a second call only replaces the settings. ``None`` disables a
    term. ``every_token_counts``: a training forward called without
    ``loss_mask`` (and no mask from ``begin_step``) counts every token as
    valid instead of raising. Raises ``RuntimeError`` for an unsupported megatron-core version or
    a moved symbol, before anything is patched.
    """
    if simreg is not None and not isinstance(simreg, SimRegConfig):
        raise TypeError(f"simreg must be a SimRegConfig or None, got {type(simreg).__name__}")
    if jreg is not None and not isinstance(jreg, JRegConfig):
        raise TypeError(f"jreg must be a JRegConfig or None, got {type(jreg).__name__}")
    compat.check_version()
    gpt_model = compat.gpt_model_class()
    schedules = compat.schedules_module()
    _ACTIVE.simreg, _ACTIVE.jreg, _ACTIVE.every_token_counts = simreg, jreg, bool(every_token_counts)
    if getattr(gpt_model, MARKER, False):
        return
    gpt_model.forward = _wrap_gpt_forward(gpt_model.forward)
    if compat.schedule_plan_method(gpt_model) is not None:
        gpt_model.build_schedule_plan = _refuse_schedule_plan(gpt_model.build_schedule_plan)
    schedules.forward_step = wrap_forward_step(schedules.forward_step, on_first_microbatch=_drop_stale_terms)
    setattr(gpt_model, MARKER, True)


def undo_megatron_patch() -> None:
    """Restore Megatron-core's originals (models keep their hooks, which then record nothing)."""
    gpt_model = compat.gpt_model_class()
    if not getattr(gpt_model, MARKER, False):
        return
    schedules = compat.schedules_module()
    gpt_model.forward = gpt_model.forward.__wrapped__
    if compat.schedule_plan_method(gpt_model) is not None:
        gpt_model.build_schedule_plan = gpt_model.build_schedule_plan.__wrapped__
    schedules.forward_step = schedules.forward_step.__wrapped__
    delattr(gpt_model, MARKER)
    _ACTIVE.simreg = _ACTIVE.jreg = None
    _ACTIVE.every_token_counts = False


def is_patched() -> bool:
    return bool(getattr(compat.gpt_model_class(), MARKER, False))


def active_configs() -> Tuple[Optional[SimRegConfig], Optional[JRegConfig], bool]:
    """``(simreg, jreg, every_token_counts)`` as last given to :func:`apply_to_megatron` (Nones when unpatched)."""
    return _ACTIVE.simreg, _ACTIVE.jreg, _ACTIVE.every_token_counts


class _Capture:
    """States recorded during one training forward of one model chunk."""

    def __init__(self):
        self.first = None  # (s_local, b, device) of the first local layer's input
        self.recorded = []  # global layer numbers, in forward order
        self.inputs = {}  # layer_number -> input, while the layer runs
        self.with_grad = {}  # layer_number -> (input, output) of a weighted layer run with autograd
        self.without_grad = {}  # layer_number -> per-token distance [s_local, b] (no graph) of a layer run
        #                         without autograd (full recompute's checkpointed layers), for logging only
        self.last_output = None  # the last local layer's output (pre_norm SimReg)
        self.final = None


class _Deferred(NamedTuple):
    """A checkpointed layer's JREG term for one micro-batch, attached when the backward recomputes the layer."""

    valid: torch.Tensor  # [s_local, b] bool
    scale: object  # multiplies the layer's distance sum: weight, normalization, loss scale
    metric: str


@functools.lru_cache(maxsize=16)
def _weights(num_layers: int, weighting: str, power: float) -> tuple:
    return tuple(layer_weights(num_layers, weighting, power).tolist())


def _weighted(layer_number: int, num_layers: int) -> bool:
    """Whether the active JREG config gives ``layer_number`` a nonzero weight (no JREG: False)."""
    cfg = _ACTIVE.jreg
    return cfg is not None and _weights(num_layers, cfg.weighting, cfg.power)[layer_number - 1] != 0.0


def _unwrap(model):
    """The GPTModel inside Megatron's wrappers (DDP, Float16Module: ``.module``)."""
    for _ in range(8):
        if hasattr(model, "_megatron_simreg_pending") or not hasattr(model, "module"):
            break
        model = model.module
    return model


def _drop_stale_terms(model) -> None:
    """At a model chunk's first micro-batch of a step: forget the terms of forwards whose backward never ran."""
    pending = getattr(_unwrap(model), "_megatron_simreg_pending", None)
    stale = sum(len(q) for q in pending.values()) if pending else 0
    if stale:
        for q in pending.values():
            q.clear()
        warnings.warn(
            f"megatron-simreg: dropped {stale} queued JREG term(s) of checkpointed layers from a training forward whose "
            "backward never ran (a probe or forward_only pass in train mode with autograd on, or an abandoned step). "
            "Run forward-only passes under torch.no_grad() or model.eval().",
            RuntimeWarning,
            stacklevel=2,
        )


def _install_hooks(model) -> None:
    if getattr(model, "_megatron_simreg_hooks", None) is not None:
        return
    handles = []
    layers = list(model.decoder.layers)
    pending = {layer.layer_number: deque() for layer in layers}  # layer_number -> _Deferred per micro-batch
    recompute_inputs = {}
    num_layers = model.config.num_layers

    def on_input(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cap = model._megatron_simreg_capture
        if cap is not None:
            if cap.first is None:
                cap.first = (hidden.shape[0], hidden.shape[1], hidden.device)
            cap.inputs[module.layer_number] = hidden
        elif pending[module.layer_number] and torch.is_grad_enabled():  # the backward recomputes this layer
            recompute_inputs[module.layer_number] = hidden

    def on_output(module, args, output):
        cap = model._megatron_simreg_capture
        hidden = compat.layer_output_hidden(output)
        n = module.layer_number
        if cap is not None:
            cap.recorded.append(n)
            cap.last_output = hidden
            inp = cap.inputs.pop(n, None)
            if inp is None or not _weighted(n, num_layers):
                return None
            if torch.is_grad_enabled():
                cap.with_grad[n] = (inp, hidden)
            else:
                # Only logged: its gradient comes from the backward's recompute. Computed now, while the input
                # still has its shape (distribute_saved_activations shrinks a checkpointed chunk's input when
                # the chunk returns) and without autograd (no graph kept alive until the backward).
                cap.without_grad[n] = token_distances(inp, hidden, _ACTIVE.jreg.metric)
        elif pending[n] and torch.is_grad_enabled():
            term = pending[n].popleft()
            d = token_distances(recompute_inputs.pop(n), hidden, term.metric)
            reg = (term.scale * (d * term.valid).sum()).reshape(())
            return compat.replace_layer_output_hidden(output, RegLossAutoScaler.apply(hidden, reg))
        return None

    def on_decoder_output(module, args, output):
        cap = model._megatron_simreg_capture
        if cap is not None:
            cap.final = compat.layer_output_hidden(output)

    handles += [layer.register_forward_pre_hook(on_input, with_kwargs=True) for layer in layers]
    handles += [layer.register_forward_hook(on_output) for layer in layers]
    handles.append(model.decoder.register_forward_hook(on_decoder_output))
    model._megatron_simreg_hooks = handles
    model._megatron_simreg_pending = pending
    model._megatron_simreg_capture = None


def _layout(model) -> ShardLayout:
    from megatron.core import parallel_state as ps

    return ShardLayout(
        ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None,
        ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None,
        bool(model.config.sequence_parallel),
    )


def _reduce_sum(t: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    t = t.detach().clone()
    for g in layout.reduce_groups():
        torch.distributed.all_reduce(t, group=g)
    return t


def _jreg_term(model, cap: _Capture, cfg: JRegConfig, mask, n_tok_mb, layout, ls):
    """This stage's attached JREG tensor (before the loss scale ``ls``); records its share of R for logging.

    The terms of layers that ran without autograd are queued on them instead (see the module docstring)."""
    w_all = _weights(model.config.num_layers, cfg.weighting, cfg.power)
    # Zero-weight layers add nothing to R or its gradient: skip them (all but one layer for "final").
    pairs = [n for n in cap.recorded if w_all[n - 1] != 0.0]
    if not pairs:  # a pipeline stage without weighted layers (the whole TP/CP group agrees): nothing to add or log
        return None
    valid = mask if mask.dtype == torch.bool else mask == 1
    scale = (cfg.weight if model.config.calculate_per_token_loss
             else cfg.weight / (n_tok_mb.clamp_min(1) * STEP.num_microbatches))
    now, logged = [], []
    for n in pairs:
        w = w_all[n - 1]
        if n in cap.without_grad:  # logged only; the backward's recompute attaches its term
            with torch.no_grad():
                d = (cap.without_grad[n] * valid).sum()
            model._megatron_simreg_pending[n].append(_Deferred(valid, ls * w * scale, cfg.metric))
        else:
            d = layer_distance_sums(list(cap.with_grad[n]), valid, metric=cfg.metric)[0][0]
            now.append(w * d)
        logged.append((w, d.detach()))
    with torch.no_grad():  # logging holds no autograd graph
        weighted = sum((w * d for w, d in logged), logged[0][1].new_zeros(()))
        tracker.record("jreg", weighted, valid.sum(), layout.reduce_groups())  # reduced once per step, in report()
    return scale * torch.stack(now).sum() if now else None


def _simreg_term(model, hidden, labels, loss_mask, cfg: SimRegConfig, layout):
    terms = parallel_simreg_terms(hidden, labels, loss_mask, cfg, layout)
    loss_sum = terms.loss_sum
    tracker.record("simreg", loss_sum, terms.num_anchors, layout.reduce_groups())  # reduced once per step
    per_token = model.config.calculate_per_token_loss
    if cfg.normalization == "micro_batch":  # the gradient needs this micro-batch's anchor count
        if per_token:  # ... and its valid tokens over all CP ranks: each counts its own in finalize's divisor
            shards = torch.stack([terms.num_anchors.to(loss_sum.dtype),
                                  (loss_mask[:, layout.local_slice(loss_mask.shape[1])] == 1).sum().to(loss_sum.dtype)])
            anchors, tokens = _reduce_sum(shards, layout)
            return cfg.weight * loss_sum * tokens / anchors.clamp_min(1)
        anchors = _reduce_sum(terms.num_anchors.to(loss_sum.dtype), layout).clamp_min(1)
        return cfg.weight * loss_sum * layout.cp / (anchors * STEP.num_microbatches)
    if STEP.num_anchors is None or (per_token and STEP.num_tokens is None):
        raise RuntimeError(
            "SimReg normalization 'global_batch' needs the global batch's anchor count"
            + (" and valid-token count (calculate_per_token_loss)" if per_token else "")
            + ": call megatron_simreg.megatron.begin_step(num_anchors=..., num_tokens=...) before "
            "forward_backward_func (count_step_anchors computes them), or use "
            "SimRegConfig(normalization='micro_batch') to normalize per micro-batch like the MoE aux loss."
        )
    from megatron.core import parallel_state as ps

    factor = (count_factor(STEP.num_tokens, loss_sum) if per_token
              else ps.get_data_parallel_world_size(with_context_parallel=True))
    return cfg.weight * loss_sum * factor / count_factor(STEP.num_anchors, loss_sum, minimum=1)


def _check_recorded(model, cap: _Capture) -> None:
    """Every local layer must have run through its hooks: a layer replayed or called around ``nn.Module.__call__``
    (a CUDA graph) would leave JREG and pre_norm SimReg silently without that layer."""
    local = [layer.layer_number for layer in model.decoder.layers]
    missing = sorted(set(local) - set(cap.recorded))
    if missing:
        raise RuntimeError(
            f"megatron-simreg: the training forward recorded no output for decoder layer(s) {missing} of "
            f"{local}: their forward hooks did not fire (a CUDA-graphed layer, --cuda-graph-impl, is replayed "
            "without nn.Module.__call__), so JREG / pre_norm SimReg cannot be computed; refusing to train without "
            "them. Turn CUDA graphs off (--cuda-graph-impl none), or disable SimReg and JREG (apply_to_megatron())."
        )


def refuse_cuda_graphs(config) -> None:
    """Raise if ``config`` (a TransformerConfig, or Megatron-LM's args: same names) turns CUDA graphs on."""
    impl = getattr(config, "cuda_graph_impl", "none")
    legacy = [f for f in ("enable_cuda_graph", "external_cuda_graph") if getattr(config, f, False)]
    if (impl is not None and impl != "none") or legacy:
        setting = f"cuda_graph_impl={impl!r}" + "".join(f", {f}=True" for f in legacy)
        raise NotImplementedError(
            f"megatron-simreg does not support CUDA graphs ({setting}; Megatron-LM's --cuda-graph-impl, or the "
            "deprecated --enable-cuda-graph / --external-cuda-graph): a graphed TransformerLayer is captured and "
            "replayed without nn.Module.__call__, so the layer hooks that JREG and pre_norm SimReg read never fire "
            "and the regularizers would silently not be trained. Use --cuda-graph-impl none, or disable SimReg and "
            "JREG (apply_to_megatron())."
        )


def _missing_loss_mask(b: int, s_cp: int, device) -> torch.Tensor:
    """``[b, s_cp]``: the mask of a training forward called without ``loss_mask`` (see the module docstring)."""
    if STEP.loss_masks is not None and STEP.current_microbatch is not None:
        full = STEP.loss_masks[STEP.current_microbatch]
        from megatron.core.utils import get_batch_on_this_cp_rank  # the slicing Megatron's data path applies

        mask = get_batch_on_this_cp_rank({"loss_mask": full.to(device)})["loss_mask"]
        if tuple(mask.shape) != (b, s_cp):
            raise ValueError(f"megatron-simreg: the step's loss mask for micro-batch {STEP.current_microbatch} has "
                             f"shape {tuple(full.shape)} (this context-parallel rank's part: {tuple(mask.shape)}), "
                             f"but the model's micro-batch is [b, s] = {[b, s_cp]}; begin_step(loss_masks=...) takes "
                             "one full-sequence [b, s] mask per micro-batch")
        return mask
    if _ACTIVE.every_token_counts:
        return torch.ones(b, s_cp, device=device)
    raise ValueError(
        "megatron-simreg: GPTModel.forward was called in training without loss_mask, so SimReg/JREG cannot tell "
        "prompt or padding tokens from valid ones. Pass loss_mask to the model in your forward_step (Megatron-LM's "
        "pretrain_gpt does; for Megatron-Bridge, use a forward_step that calls model(..., labels=labels, "
        "loss_mask=loss_mask)), or say that every token counts: apply_to_megatron(..., every_token_counts=True) "
        "(Megatron-LM adapter: --reg-every-token-counts)."
    )


def _attach(model, out, cap: _Capture, labels, loss_mask):
    layout = _layout(model)
    simreg, jreg = _ACTIVE.simreg, _ACTIVE.jreg
    pre_norm = simreg is not None and model.post_process and labels is not None and simreg.representation == "pre_norm"
    if jreg is not None or pre_norm:
        _check_recorded(model, cap)
    s_local, b, device = (*cap.final.shape[:2], cap.final.device) if cap.final is not None else cap.first
    if loss_mask is None:  # the mask spans this CP rank's sequence
        s_cp = labels.shape[1] if labels is not None else s_local * (layout.tp if layout.sequence_parallel else 1)
        loss_mask = _missing_loss_mask(b, s_cp, device)
    n_tok_mb = (loss_mask == 1).sum().to(torch.float32)
    ls = loss_scale(device)
    attached = []
    if jreg is not None:
        local = layout.local_slice(loss_mask.shape[1])
        term = _jreg_term(model, cap, jreg, loss_mask[:, local].transpose(0, 1), n_tok_mb, layout, ls)
        if term is not None:
            attached.append(term)
    if simreg is not None and model.post_process and labels is not None:
        hidden = cap.final if simreg.representation == "post_norm" else cap.last_output
        attached.append(_simreg_term(model, hidden, labels, loss_mask, simreg, layout))
    if not attached:
        return out
    reg = torch.stack([t.float() for t in attached]).sum()
    if out.requires_grad and not reg.requires_grad:  # never log a term that contributes no gradient
        raise RuntimeError(
            "megatron-simreg: the SimReg/JREG term has no autograd history (states captured without autograd, e.g. "
            "under an activation-recompute path it does not know); refusing to train without it."
        )
    return RegLossAutoScaler.apply(out, (ls * reg).reshape(()))


def _refuse_schedule_plan(original):
    def build_schedule_plan(self, *args, **kwargs):
        if self.training and (_ACTIVE.simreg is not None or _ACTIVE.jreg is not None):
            raise NotImplementedError(
                "megatron-simreg does not support the combined 1F1B schedule (overlap_moe_expert_parallel_comm): "
                "it runs GPTModel.build_schedule_plan instead of forward, so SimReg and JREG would silently not be "
                "trained. Turn overlap_moe_expert_parallel_comm off, or disable SimReg and JREG (apply_to_megatron())."
            )
        return original(self, *args, **kwargs)

    build_schedule_plan.__wrapped__ = original
    build_schedule_plan.__name__ = original.__name__
    build_schedule_plan.__doc__ = original.__doc__
    return build_schedule_plan


def _wrap_gpt_forward(original):
    sig = inspect.signature(original)

    def forward(self, *args, **kwargs):
        if not self.training or (_ACTIVE.simreg is None and _ACTIVE.jreg is None) or not torch.is_grad_enabled():
            return original(self, *args, **kwargs)
        refuse_cuda_graphs(self.config)  # before anything CUDA-graph-specific runs
        bound = sig.bind(self, *args, **kwargs)
        labels, loss_mask = bound.arguments.get("labels"), bound.arguments.get("loss_mask")
        if bound.arguments.get("packed_seq_params") is not None:
            # THD packing puts several documents in one row; "same sequence" would pair across them.
            raise NotImplementedError(
                "megatron-simreg does not support packed sequences (packed_seq_params / THD layout) yet: "
                "train with unpacked [b, s] batches, or disable SimReg and JREG (apply_to_megatron())."
            )
        _install_hooks(self)
        cap = self._megatron_simreg_capture = _Capture()
        try:
            out = original(self, *args, **kwargs)
        finally:
            self._megatron_simreg_capture = None
        return _attach(self, out, cap, labels, loss_mask)

    forward.__wrapped__ = original
    forward.__name__ = original.__name__
    forward.__doc__ = original.__doc__
    return forward
