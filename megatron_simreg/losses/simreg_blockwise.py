"""Memory-bounded SimReg: query blocks against keys, recomputed in backward.

Per anchor row ``i`` SimReg needs only three statistics (see
:mod:`.simreg`): ``lse_i`` over allowed keys, the mean positive similarity and
the positive count. The forward pass walks blocks of ``block_size`` anchors;
each block sees its key range (the whole sequence, or only the chunks the
block overlaps), keeps the per-row statistics and drops the tile. The backward
pass recomputes each ``[b, block, keys]`` tile, FlashAttention-style, and
accumulates ``dz_q`` and ``dz_k``.

Peak extra memory: O(b * s * h) for the gradients plus O(b * block * s) for
one tile. No ``s x s`` tensor is ever held. A block sees all of its keys at
once, so its log-sum-exp is exact without an online rescaling; the Triton
kernel, whose tiles are also blocked along keys, does the online version.

Gradient of ``l_i = lse_i - mean_{p in P(i)} S_ip`` with ``S = z_q z_k^T / tau``::

    dl_i/dS_ij = softmax_{A(i)}(S_i)_j - [j in P(i)] / |P(i)|     (G_ij)
    dz_q = (g * G) @ z_k / tau,      dz_k = (g * G)^T @ z_q / tau
"""

from __future__ import annotations

from typing import Optional

import torch

DEFAULT_BLOCK_SIZE = 256


def _key_range(q0: int, q1: int, num_keys: int, chunk_size: Optional[int], contiguous: bool):
    """Keys a query block [q0, q1) can reach: all, or its chunks when contiguous."""
    if chunk_size is None or not contiguous:
        return 0, num_keys
    return (q0 // chunk_size) * chunk_size, min(num_keys, ((q1 - 1) // chunk_size + 1) * chunk_size)


def similarity_tile(zq, yq, vq, pq, zk, yk, vk, pk, temperature, chunk_size, dq=None, dk=None):
    """Similarities ``[b, bq, bk]`` and the allowed / positive masks of one tile.

    ``dq``/``dk`` ``[b, bq]``/``[b, bk]``: optional document ids; a pair needs equal ids.
    The naive reference calls it once with the whole sequence as the tile.
    """
    sim = (zq / temperature) @ zk.transpose(-1, -2)
    allowed = vq[:, :, None] & vk[:, None, :] & (pq[:, None] != pk[None, :])
    if chunk_size is not None:
        allowed = allowed & (pq[:, None] // chunk_size == pk[None, :] // chunk_size)
    if dq is not None:
        allowed = allowed & (dq[:, :, None] == dk[:, None, :])
    positive = allowed & (yq[:, :, None] == yk[:, None, :])
    return sim, allowed, positive


class BlockwiseSimReg(torch.autograd.Function):
    """Inputs as :func:`blockwise_simreg`; returns ``(per_token [b, sq], anchors [b, sq])``."""

    @staticmethod
    def forward(ctx, zq, zk, yq, yk, vq, vk, pq, pk, dq, dk, temperature, chunk_size, contiguous, block_size,
                norm_eps):
        # zk=None: the anchors are their own keys; one gradient buffer then
        # serves both roles instead of two that autograd would add up.
        ctx.self_keys = zk is None
        # norm_eps set: the states are raw, normalized here so that the
        # normalization's backward reuses the gradient buffers in place.
        norms_q = norms_k = None
        if norm_eps is not None:
            norms_q = zq.norm(dim=-1, keepdim=True).clamp_min(norm_eps)
            zq = zq / norms_q
            if zk is not None:
                norms_k = zk.norm(dim=-1, keepdim=True).clamp_min(norm_eps)
                zk = zk / norms_k
        if zk is None:
            zk, yk, vk, pk, dk = zq, yq, vq, pq, dq
        b, sq, _ = zq.shape
        lse = zq.new_zeros(b, sq)
        pos_sum = zq.new_zeros(b, sq)
        num_pos = torch.zeros(b, sq, dtype=torch.long, device=zq.device)
        for q0 in range(0, sq, block_size):
            q1 = min(q0 + block_size, sq)
            k0, k1 = _key_range(q0, q1, zk.shape[1], chunk_size, contiguous)
            sim, allowed, positive = similarity_tile(
                zq[:, q0:q1], yq[:, q0:q1], vq[:, q0:q1], pq[q0:q1],
                zk[:, k0:k1], yk[:, k0:k1], vk[:, k0:k1], pk[k0:k1], temperature, chunk_size,
                *_doc_tiles(dq, dk, q0, q1, k0, k1),
            )
            pos_sum[:, q0:q1] = torch.where(positive, sim, 0.0).sum(-1)
            lse[:, q0:q1] = torch.logsumexp(sim.masked_fill_(~allowed, float("-inf")), dim=-1)
            num_pos[:, q0:q1] = positive.sum(-1)
        anchors = num_pos > 0
        # Non-anchor rows may have lse = -inf (no allowed key); zero them so the
        # backward's exp(sim - lse) stays finite.
        lse = torch.where(anchors, lse, 0.0)
        per_token = torch.where(anchors, lse - pos_sum / num_pos.clamp_min(1), 0.0)
        ctx.save_for_backward(zq, zk, yq, yk, vq, vk, pq, pk, dq, dk, lse, num_pos, anchors, norms_q, norms_k)
        ctx.args = (temperature, chunk_size, contiguous, block_size, norm_eps)
        ctx.mark_non_differentiable(anchors)
        return per_token, anchors

    @staticmethod
    def backward(ctx, grad_per_token, _grad_anchors):
        zq, zk, yq, yk, vq, vk, pq, pk, dq, dk, lse, num_pos, anchors, norms_q, norms_k = ctx.saved_tensors
        temperature, chunk_size, contiguous, block_size, norm_eps = ctx.args
        # Rows that are not anchors contribute nothing (their l_i is a constant 0).
        row_weight = torch.where(anchors, grad_per_token, 0.0) / temperature
        inv_pos = 1.0 / num_pos.clamp_min(1).to(zq.dtype)
        grad_q = torch.zeros_like(zq)
        grad_k = grad_q if ctx.self_keys else torch.zeros_like(zk)
        sq = zq.shape[1]
        for q0 in range(0, sq, block_size):
            q1 = min(q0 + block_size, sq)
            k0, k1 = _key_range(q0, q1, zk.shape[1], chunk_size, contiguous)
            sim, allowed, positive = similarity_tile(
                zq[:, q0:q1], yq[:, q0:q1], vq[:, q0:q1], pq[q0:q1],
                zk[:, k0:k1], yk[:, k0:k1], vk[:, k0:k1], pk[k0:k1], temperature, chunk_size,
                *_doc_tiles(dq, dk, q0, q1, k0, k1),
            )
            # In place on the tile: each extra [b, block, keys] float temporary
            # costs as much memory as the tile itself.
            g = sim.sub_(lse[:, q0:q1, None]).exp_().masked_fill_(~allowed, 0.0)
            g.sub_(positive.to(g.dtype).mul_(inv_pos[:, q0:q1, None]))
            g.mul_(row_weight[:, q0:q1, None])
            grad_q[:, q0:q1] += g @ zk[:, k0:k1]
            grad_k[:, k0:k1] += g.transpose(-1, -2) @ zq[:, q0:q1]
        if norm_eps is not None:
            _normalize_backward_(grad_q, zq, norms_q, norm_eps)
            if not ctx.self_keys:
                _normalize_backward_(grad_k, zk, norms_k, norm_eps)
        return grad_q, None if ctx.self_keys else grad_k, *([None] * 13)


def _doc_tiles(dq, dk, q0, q1, k0, k1):
    """The document ids of one tile's anchors and keys, or ``(None, None)`` without documents."""
    return (None, None) if dq is None else (dq[:, q0:q1], dk[:, k0:k1])


def _normalize_backward_(grad: torch.Tensor, z: torch.Tensor, norms: torch.Tensor, eps: float) -> None:
    """In place: ``d(h / n)/dh`` applied to ``grad``, ``(g - z (z . g)) / n``, or ``g / eps`` where ``n`` was clamped."""
    dot = (z.unsqueeze(-2) @ grad.unsqueeze(-1)).squeeze(-1)
    dot = torch.where(norms > eps, dot, 0.0)
    grad.addcmul_(z, dot, value=-1.0).div_(norms)


def blockwise_simreg(
    zq: torch.Tensor,
    yq: torch.Tensor,
    vq: torch.Tensor,
    pq: torch.Tensor,
    zk: torch.Tensor,
    yk: torch.Tensor,
    vk: torch.Tensor,
    pk: torch.Tensor,
    temperature: float,
    chunk_size: Optional[int],
    *,
    contiguous: bool = False,
    block_size: Optional[int] = None,
    norm_eps: Optional[float] = None,
    dq: Optional[torch.Tensor] = None,
    dk: Optional[torch.Tensor] = None,
):
    """Blockwise SimReg on normalized states (or raw ones with ``norm_eps``).

    ``zq`` ``[b, sq, h]`` anchors and ``zk`` ``[b, sk, h]`` keys (pass the same
    tensor twice for self-similarity), labels ``y*`` and bool validity ``v*``
    ``[b, s*]``, positions ``p*`` ``[s*]``. ``contiguous=True`` promises
    ``pq == pk == arange`` so chunked mode only visits the block's own chunks.
    ``block_size`` defaults to ``DEFAULT_BLOCK_SIZE``, read at call time.
    ``norm_eps``: when set, ``zq`` and ``zk`` hold raw states that are
    normalized inside as ``h / max(||h||, norm_eps)``, saving O(s * h) memory.
    ``dq``/``dk`` ``[b, s*]``: optional document ids (a pair needs equal ids).
    Returns ``(per_token [b, sq], anchors [b, sq])``.
    """
    block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    if zk is zq and yk is yq and vk is vq and pk is pq and dk is dq:
        zk = None
    return BlockwiseSimReg.apply(zq, zk, yq, yk, vq, vk, pq, pk, dq, dk, temperature, chunk_size, contiguous,
                                 block_size, norm_eps)
