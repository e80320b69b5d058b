r"""JREG: suppressing final-layer hidden-state jumps (arXiv 2601.18302).

Symbols
-------
``h_0`` the input of the first layer, ``h_l`` the output of layer ``l``
(``l = 1..L``), each ``[b, s, h]``.

* Layer distance: ``d_l = mean over valid tokens of arccos(cos(h_{l-1}, h_l)) / pi``
  (``metric="angular"``), or ``(1 - cos) / 2`` (``metric="cosine"``). Both
  give 0 for parallel, 0.5 for orthogonal and 1 for opposite states.
* Jump strength: ``J = d_L / mean(d_1 .. d_{L-1})``: how much larger the last
  layer's step is than the average earlier one (``J >> 1`` is the jump the
  paper suppresses).
* Penalty: ``R = sum_l w_l d_l`` with ``w_L = 1`` only (``"final"``) or
  ``w_l ∝ (l/L)^p`` normalized to sum 1 (``"layer_weighted"``).
* Objective: ``L = L_LM + alpha * R``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..config import JREG_METRICS, JREG_WEIGHTINGS, check_choice

NORM_EPS = 1e-8


def token_distances(a: torch.Tensor, b: torch.Tensor, metric: str = "angular") -> torch.Tensor:
    """Per-token distance ``[...]`` between states ``a`` and ``b`` ``[..., h]``, in fp32 (float64 kept)."""
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    a, b = a.to(dtype), b.to(dtype)
    cos = (a * b).sum(-1) / (a.norm(dim=-1).clamp_min(NORM_EPS) * b.norm(dim=-1).clamp_min(NORM_EPS))
    if metric == "cosine":
        return (1.0 - cos) / 2.0
    # Clamp inside (-1, 1): d/dx arccos(x) = -1/sqrt(1 - x^2) is infinite at
    # +-1, which parallel states (a layer that adds ~0) reach. One ulp below 1
    # biases a parallel pair by sqrt(2 eps)/pi: 1.6e-4 in fp32, 7e-9 in fp64,
    # below what the dtype's cosine can resolve anyway.
    bound = 1.0 - torch.finfo(dtype).eps
    return torch.arccos(cos.clamp(-bound, bound)) / math.pi


def _check_states(states, loss_mask):
    if not isinstance(states, (list, tuple)) or len(states) < 2:
        raise ValueError("states must be a list [h_0, h_1, ..., h_L] of at least 2 tensors (layer input + outputs)")
    shape = states[0].shape
    for i, s in enumerate(states):
        if not isinstance(s, torch.Tensor) or not s.is_floating_point() or s.dim() < 2 or s.shape != shape:
            raise ValueError(
                f"states[{i}] must be a floating-point tensor shaped like states[0] {tuple(shape)} ([b, s, h]), got "
                + (f"{tuple(s.shape)} {s.dtype}" if isinstance(s, torch.Tensor) else repr(type(s)))
            )
    if states[0].numel() == 0:
        raise ValueError(f"states must be non-empty, got shape {tuple(shape)}")
    if loss_mask is not None and (not isinstance(loss_mask, torch.Tensor) or loss_mask.shape != shape[:-1]):
        raise ValueError(
            f"loss_mask must be None or a tensor of shape {tuple(shape[:-1])} (the states without h), got "
            + (f"{tuple(loss_mask.shape)}" if isinstance(loss_mask, torch.Tensor) else repr(type(loss_mask)))
        )


def layer_distance_sums(
    states: Sequence[torch.Tensor], loss_mask: Optional[torch.Tensor] = None, *, metric: str = "angular",
    pairs: Optional[Sequence[int]] = None,
):
    """``(sums [L], count)``: per-layer distance summed over valid tokens, and the token count.

    For distributed callers, which all-reduce both before dividing.
    ``pairs``: compute only these layers (indices into ``states[1:]``); the
    sums then have one entry per listed layer. The training patch lists the
    layers with a nonzero weight, so that ``weighting="final"`` costs one
    layer's distance instead of ``L``.
    """
    check_choice("metric", metric, JREG_METRICS)
    _check_states(states, loss_mask)
    mask = None
    if loss_mask is not None:
        mask = (loss_mask if loss_mask.dtype == torch.bool else loss_mask == 1)
    sums = []
    for i in range(len(states) - 1) if pairs is None else pairs:
        d = token_distances(states[i], states[i + 1], metric)
        sums.append((d * mask).sum() if mask is not None else d.sum())
    count = mask.sum() if mask is not None else torch.tensor(states[0][..., 0].numel(), device=states[0].device)
    if not sums:
        return states[0].new_zeros(0, dtype=torch.float32), count
    return torch.stack(sums), count


def layer_angular_distances(
    states: Sequence[torch.Tensor], loss_mask: Optional[torch.Tensor] = None, *, metric: str = "angular"
) -> torch.Tensor:
    """``d`` ``[L]``: mean distance between consecutive states over valid tokens.

    ``states`` = ``[h_0, ..., h_L]``, each ``[b, s, h]`` (any leading dims);
    ``loss_mask`` ``[b, s]`` (valid where ``== 1``). With no valid token the
    distances are 0.
    """
    sums, count = layer_distance_sums(states, loss_mask, metric=metric)
    return sums / count.clamp_min(1)


def jump_strength(d: torch.Tensor) -> torch.Tensor:
    """``J = d_L / mean(d_1 .. d_{L-1})`` for ``d`` ``[L]``, ``L >= 2``."""
    if not isinstance(d, torch.Tensor) or d.dim() != 1 or d.numel() < 2:
        raise ValueError("jump_strength needs the distances d [L] of at least 2 layers")
    return d[-1] / d[:-1].mean().clamp_min(1e-12)


def layer_weights(num_layers: int, weighting: str = "final", power: float = 1.0, *, device=None, dtype=torch.float32):
    """``w`` ``[L]``: ``"final"`` is one-hot on the last layer; ``"layer_weighted"`` is ``(l/L)^p``, summing to 1."""
    check_choice("weighting", weighting, JREG_WEIGHTINGS)
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if weighting == "final":
        w = torch.zeros(num_layers, device=device, dtype=dtype)
        w[-1] = 1.0
        return w
    w = (torch.arange(1, num_layers + 1, device=device, dtype=dtype) / num_layers) ** power
    return w / w.sum()


def jreg_penalty(d: torch.Tensor, weighting: str = "final", power: float = 1.0) -> torch.Tensor:
    """``R = sum_l w_l d_l`` for ``d`` ``[L]``; see :func:`layer_weights`."""
    if not isinstance(d, torch.Tensor) or d.dim() != 1 or d.numel() < 1:
        raise ValueError("jreg_penalty needs the distances d [L] of at least 1 layer")
    return (layer_weights(d.numel(), weighting, power, device=d.device, dtype=d.dtype) * d).sum()
