"""Representation statistics from the SimReg paper's analysis."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


@torch.no_grad()
def label_cosine_similarity(hidden: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor] = None,
                            ignore_index: int = -100):
    """Mean cosine similarity of token pairs within a sequence: ``(intra, inter)``.

    ``hidden`` ``[b, s, h]``, ``labels`` ``[b, s]``. Intra-label pairs share the
    next-token label, inter-label pairs do not; self-pairs and invalid tokens
    are excluded. SimReg should raise ``intra`` relative to ``inter``.
    Returns two Python floats (``nan`` when a kind of pair does not occur).
    """
    z = F.normalize(hidden.float(), dim=-1)
    valid = labels != ignore_index
    if loss_mask is not None:
        valid &= loss_mask.bool()
    cos = z @ z.transpose(-1, -2)
    pair = valid[:, :, None] & valid[:, None, :] & ~torch.eye(labels.shape[1], dtype=torch.bool, device=labels.device)
    same = labels[:, :, None] == labels[:, None, :]
    intra, inter = pair & same, pair & ~same
    mean = lambda m: (cos[m].mean().item() if m.any() else float("nan"))  # noqa: E731
    return mean(intra), mean(inter)


@torch.no_grad()
def classification_margins(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Logit of the true token minus the best other logit, for every labelled token.

    ``logits`` ``[..., V]``, ``labels`` ``[...]``; returns a 1-D float tensor.
    """
    valid = labels != ignore_index
    logits, labels = logits[valid].float(), labels[valid]
    true = logits.gather(-1, labels[:, None]).squeeze(-1)
    other = logits.scatter(-1, labels[:, None], float("-inf")).amax(-1)
    return true - other
