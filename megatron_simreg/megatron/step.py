"""How the regularizers reach the gradient, and with which scale.

Megatron-core adds its MoE load-balancing and MTP losses to the gradient
without changing the returned LM loss: an autograd function that is the
identity on an activation in forward and, in backward, also back-propagates
``ones * scale`` into the auxiliary loss (``MoEAuxLossAutoScaler``,
``MTPLossAutoScaler``). :class:`RegLossAutoScaler` does the same; the scale is
folded into the attached tensor, so its backward seed is plain 1.

Gradient scale (per micro-batch, on one rank; ``M`` micro-batches, loss scale
``ls`` from ``config.grad_scale_func`` for fp16, else 1):

======================  ==============================  ==========================================
term                    ``calculate_per_token_loss``    attached
======================  ==============================  ==========================================
JREG                    True                            ``ls * alpha * S_J``
JREG                    False                           ``ls * alpha * S_J / (N_tok_mb * M)``
SimReg global_batch     True                            ``ls * lambda * S_S * N_tok / N_anch``
SimReg global_batch     False                           ``ls * lambda * S_S * dp_cp / N_anch``
SimReg micro_batch      True                            ``ls * lambda * S_S * N_tok_mb / N_anch_mb``
SimReg micro_batch      False                           ``ls * lambda * S_S * cp / (N_anch_mb * M)``
======================  ==============================  ==========================================

``S_J`` is the rank's layer-weighted sum of per-token layer distances,
``S_S`` its sum of SimReg ``l_i``; ``N_tok_mb`` the micro-batch's valid tokens
on this CP rank (as Megatron's ``loss_func`` counts them) for JREG, and summed
over the CP ranks for SimReg (``finalize_model_grads`` divides by every CP
rank's own count, and the CP ranks' SimReg shares add up to one micro-batch
term); ``N_anch_mb`` its anchors summed over TP/CP; ``N_tok`` and ``N_anch``
the global batch's totals; ``dp_cp`` the data x context parallel size.

Why: with ``calculate_per_token_loss`` Megatron sums micro-batch gradients and
divides once by the global token count; without it each micro-batch's mean is
divided by ``M`` and data-parallel gradients are averaged over ``dp_cp``. The
rows above make JREG follow the LM loss's own convention, and make
``global_batch`` SimReg exactly ``lambda * (sum of l_i over the global batch) /
(global anchor count)`` in both cases, i.e. the gradient of one large batch.
That needs ``N_anch`` (and ``N_tok``) before the first backward: anchors
depend only on labels and the mask, so the driver counts them from the whole
batch and calls :func:`begin_step` (our trainer does). ``micro_batch`` needs
nothing and mirrors the MoE aux loss: a mean of per-micro-batch anchor means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch


class RegLossAutoScaler(torch.autograd.Function):
    """Identity on ``output``; backward also seeds ``reg_loss`` with ones.

    Returns an alias of ``output``'s storage that is not a view: autograd makes
    an input returned as-is a view of it, and Megatron's pipeline schedules
    free a stage's output after sending it (``deallocate_pipeline_outputs``),
    which they refuse for a view.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, reg_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(reg_loss)
        return output.detach()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (reg_loss,) = ctx.saved_tensors
        return grad_output, torch.ones_like(reg_loss)


@dataclass
class StepState:
    """What the current training step tells the forward pass."""

    num_microbatches: int = 1
    # Megatron's config.grad_scale_func (the optimizer's loss scaling), or None for a scale of 1.
    grad_scale_func: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    # Global-batch counts: Python numbers, or 0-dim tensors (on the GPU when the caller counted there).
    num_anchors: Union[int, torch.Tensor, None] = None  # for SimReg "global_batch"
    num_tokens: Union[int, torch.Tensor, None] = None  # for calculate_per_token_loss
    # The step's loss masks, one full-sequence [b, s] tensor per micro-batch, for a model called without
    # loss_mask (Megatron-LM: middle pipeline stages, the first stage's TP ranks > 0); indexed by current_microbatch.
    loss_masks: Optional[Sequence[torch.Tensor]] = None
    current_microbatch: Optional[int] = None  # as schedules.forward_step numbers it, None where it does not


STEP = StepState()


def begin_step(num_anchors=None, num_tokens=None, loss_masks=None) -> None:
    """Announce the global batch's SimReg anchor count (and valid-token count).

    Call once per training step, before ``forward_backward_func``, with the
    counts summed over all micro-batches and data-parallel ranks
    (:func:`megatron_simreg.megatron.count_step_anchors` computes them).
    Ints or 0-dim tensors: a GPU tensor stays on the GPU (counting on the
    device costs no host sync) and an int stays on the host (no
    host-to-device copy per micro-batch). ``num_tokens`` is needed only with
    ``calculate_per_token_loss``.

    ``loss_masks``: this rank's micro-batches' masks, full-sequence ``[b, s]``
    in natural position order, one per micro-batch; a training forward
    called without ``loss_mask`` takes micro-batch ``current_microbatch``'s
    (sliced for context parallelism). Needed only where the model is called
    without ``loss_mask`` (Megatron-LM's first and middle pipeline stages).
    """
    STEP.loss_masks = list(loss_masks) if loss_masks is not None else None
    STEP.num_anchors = num_anchors.detach() if isinstance(num_anchors, torch.Tensor) else num_anchors
    STEP.num_tokens = num_tokens.detach() if isinstance(num_tokens, torch.Tensor) else num_tokens


def count_factor(count, like: torch.Tensor, minimum: Optional[int] = None):
    """A ``begin_step`` count as a multiplier of ``like``: a tensor on its device and dtype, or a Python float."""
    if isinstance(count, torch.Tensor):
        count = count.to(like.device, like.dtype)
        return count if minimum is None else count.clamp_min(minimum)
    return float(count if minimum is None else max(count, minimum))


def loss_scale(device: torch.device):
    """The step's loss scale: a ``[1]`` tensor on ``device`` (as Megatron computes it for its MoE aux loss:
    ``grad_scale_func`` returns a tensor on the optimizer's device, so no host sync), or 1.0."""
    fn = STEP.grad_scale_func
    return fn(torch.ones(1, device=device)) if fn is not None else 1.0


def end_step() -> None:
    """Forget the step's counts and masks so that a stale one is never reused."""
    STEP.num_anchors = STEP.num_tokens = STEP.loss_masks = None


def wrap_forward_step(original, on_first_microbatch: Optional[Callable] = None):
    """Wrap ``schedules.forward_step`` to record ``M`` and the loss scale, as it does for MoE.

    ``on_first_microbatch(model)`` runs before a model chunk's first micro-batch of each step
    (``current_microbatch == 0``, as every schedule numbers them per chunk; ``is_first_microbatch`` where a
    caller passes no number), in training and forward-only passes alike: nothing of an earlier step's
    forwards may be left for this step's backward.
    """
    from inspect import signature

    sig = signature(original)

    def forward_step(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        config = bound.arguments["config"]
        STEP.num_microbatches = int(bound.arguments["num_microbatches"])
        STEP.grad_scale_func = getattr(config, "grad_scale_func", None)
        current = bound.arguments.get("current_microbatch")
        STEP.current_microbatch = current
        if on_first_microbatch is not None:
            first = current == 0 if current is not None else bool(bound.arguments.get("is_first_microbatch"))
            if first:
                on_first_microbatch(bound.arguments["model"])
        return original(*args, **kwargs)

    forward_step.__wrapped__ = original
    forward_step.__name__ = original.__name__
    forward_step.__doc__ = original.__doc__
    return forward_step
