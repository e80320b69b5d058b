r"""Fused SimReg in Triton (``impl="triton"``).

Same inputs and result as :func:`megatron_simreg.losses.simreg_blockwise.blockwise_simreg`:
anchors ``zq`` ``[b, sq, h]``, keys ``zk`` ``[b, sk, h]``, labels ``y*`` and
validity ``v*`` ``[b, s*]``, positions ``p*`` ``[s*]``; returns
``(per_token [b, sq] fp32, anchors [b, sq] bool)``. The definition is in
:mod:`megatron_simreg.losses.simreg`.

Forward (one Triton kernel). Program ``(m, split, batch)`` owns ``BLOCK_M``
anchors and streams ``BLOCK_N`` key blocks of its share of the keys. Each
``BLOCK_M x BLOCK_N`` similarity tile is a ``tl.dot`` over the hidden dimension
in ``BLOCK_K`` slices with an fp32 accumulator; the masks (valid, not the same
position, same chunk, same label) are built in registers from int32 labels,
positions (-1 marking invalid tokens) and chunk ids, never stored. Per row it keeps an online
log-sum-exp over allowed keys, the sum of positive similarities and the
positive count. When there are too few anchor blocks to fill the GPU the keys
are split over ``split`` programs whose partial statistics are merged
afterwards (``O(splits * b * sq)``). The states are read in their own dtype
(bf16/fp16/fp32) together with fp32 inverse norms ``r = 1 / max(||x||, eps)``,
so ``S_ij = r_i r_j (x_i . x_j) / tau``: products of bf16 values are exact in
fp32, and no normalized copy is made.

Backward. With ``D_ij = g_i (softmax_A(i)(S_i)_j - [j in P(i)] / |P(i)|)``::

    dz_i = sum_j D_ij z_j / tau,      dz_j = sum_i D_ij z_i / tau

FlashAttention keeps a ``BLOCK_M x d`` gradient accumulator in registers,
which works for attention heads (``d <= 256``) but not here: ``h`` is the model
width (2048-8192), so a ``BLOCK_M x h`` fp32 accumulator does not fit. The
backward therefore works on slabs of ``R`` anchor rows: a Triton kernel
recomputes every similarity tile of the slab (the same ``tl.dot`` loop) and
writes ``F_ij = D_ij r_i r_j / tau`` (bf16 for bf16 input, else fp32) into an
``[b, R, sk]`` buffer, and two GEMMs (cuBLAS, fp32 output) give
``r_i dz_i = (F @ x_k)_i`` and ``r_j dz_j = (F^T @ x_q)_j``. No atomics; the
result is deterministic. ``R`` is chosen so that the buffer holds at most
``max(b * sq * h, SLAB_MIN_ELEMS)`` elements, so the peak extra memory stays
``O(s * h)``: the fp32 gradient accumulator, one GEMM output and the slab.
When the anchors are their own keys both terms go into one accumulator, and
with ``norm_eps`` the normalization's backward
``dh = u - r^2 x (x . u)`` (``u = r dz``) is applied in place.

FLOPs: ``2 sq sk h`` for the forward similarities; the backward recomputes
them and does two GEMMs of the same size, ``3 * 2 sq sk h``.

Chunked mode with contiguous positions (``contiguous=True``) is run as a batch
of independent chunks (``[b * s / c, c, h]``, plus the tail, while that batch
fits the grid's 65535 limit), so no work is spent on pairs in different
chunks. Other chunked inputs (sharded positions) mask by chunk id
(``pos // chunk_size``) inside the kernels. Documents (``dq``/``dk``) use the
same mask: the segment id is ``doc + pos // chunk_size`` (``doc`` without
chunks). Both terms are non-decreasing in the position, so two positions of a
row share an id exactly when they share both the document and the chunk.

On CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set
before ``triton`` is imported); the interpreter mis-handles ``tl.dot`` on
bf16 operands, so there the tiles are upcast to fp32 first (the products
are the same: bf16 * bf16 is exact in fp32).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr: jit code may read it
# The backward's slab buffer may hold max(b * sq * h, SLAB_MIN_ELEMS) elements.
SLAB_MIN_ELEMS = 1 << 25
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Launch configurations, keyed by the states' element size: a first choice,
# not yet tuned (measured on an H100 in docs/performance.md). Tests pass
# smaller blocks through ``triton_simreg``'s keywords.
FWD_CONFIG = {
    2: dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    4: dict(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=3),
}
BWD_CONFIG = {
    2: dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3),
    4: dict(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=3),
}
# The compiled kernels of the latest launches ("fwd", "bwd"; None under the
# interpreter): tools/bench_triton_configs.py reports their registers,
# spills and shared memory.
LAST_LAUNCH: dict = {}


@triton.jit
def _simreg_fwd_kernel(
    XQ, RQ, YQ, PQ, CQ, XK, RK, YK, PK, CK, LSE, PSUM, NPOS,
    SQ, SK, H,
    stride_xqb, stride_xqs, stride_xkb, stride_xks,
    inv_tau,
    CHUNKED: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_H: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """Per-row statistics of anchors ``[pid_m * BLOCK_M, +BLOCK_M)`` over key split ``pid_s``.

    Token metadata is int32 ``[b, s]``: ``P`` position (-1 marks an invalid
    token), ``Y`` label, ``C`` segment id (chunk and document; only read when
    ``CHUNKED``), ``R`` fp32 inverse norm. Allowed pair: both valid,
    ``P_q != P_k``, same segment.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2)
    bb = pid_b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < SQ
    offs_k = tl.arange(0, BLOCK_K)
    yq = tl.load(YQ + bb * SQ + offs_m, mask=m_mask, other=0)
    pq = tl.load(PQ + bb * SQ + offs_m, mask=m_mask, other=-1)
    rq = tl.load(RQ + bb * SQ + offs_m, mask=m_mask, other=0.0)
    if CHUNKED:
        cq = tl.load(CQ + bb * SQ + offs_m, mask=m_mask, other=-1)
    vq = pq >= 0
    xq_ptrs = XQ + bb * stride_xqb + offs_m[:, None] * stride_xqs + offs_k[None, :]

    per_split = tl.cdiv(tl.cdiv(SK, BLOCK_N), SPLITS) * BLOCK_N
    n_start = pid_s * per_split
    n_end = tl.minimum(n_start + per_split, SK)
    # A block without a valid anchor has nothing to compute.
    n_end = tl.where(tl.max(vq.to(tl.int32), 0) > 0, n_end, n_start)

    scale2 = inv_tau * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    p_sum = tl.zeros([BLOCK_M], tl.float32)
    n_pos = tl.zeros([BLOCK_M], tl.int32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_end
        xk_ptrs = XK + bb * stride_xkb + offs_n[:, None] * stride_xks + offs_k[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for h0 in range(0, H, BLOCK_K):
            if EVEN_H:
                q = tl.load(xq_ptrs + h0, mask=m_mask[:, None], other=0.0)
                k = tl.load(xk_ptrs + h0, mask=n_mask[:, None], other=0.0)
            else:
                h_mask = (h0 + offs_k) < H
                q = tl.load(xq_ptrs + h0, mask=m_mask[:, None] & h_mask[None, :], other=0.0)
                k = tl.load(xk_ptrs + h0, mask=n_mask[:, None] & h_mask[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                k = k.to(tl.float32)
            acc = tl.dot(q, tl.trans(k), acc, input_precision=PREC)
        pk = tl.load(PK + bb * SK + offs_n, mask=n_mask, other=-1)
        yk = tl.load(YK + bb * SK + offs_n, mask=n_mask, other=0)
        rk = tl.load(RK + bb * SK + offs_n, mask=n_mask, other=0.0)
        allowed = vq[:, None] & (pk >= 0)[None, :] & (pq[:, None] != pk[None, :])
        if CHUNKED:
            ck = tl.load(CK + bb * SK + offs_n, mask=n_mask, other=-1)
            allowed = allowed & (cq[:, None] == ck[None, :])
        cos = acc * rq[:, None] * rk[None, :]
        positive = allowed & (yq[:, None] == yk[None, :])
        p_sum += tl.sum(tl.where(positive, cos, 0.0), 1)
        n_pos += tl.sum(positive.to(tl.int32), 1)
        s2 = tl.where(allowed, cos * scale2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s2 - m_safe[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, (m_i + tl.log2(tl.maximum(l_i, 1.0))) / LOG2E, float("-inf"))
    out = (pid_s * tl.num_programs(2) + pid_b).to(tl.int64) * SQ + offs_m
    tl.store(LSE + out, lse, mask=m_mask)
    tl.store(PSUM + out, p_sum * inv_tau, mask=m_mask)
    tl.store(NPOS + out, n_pos, mask=m_mask)


@triton.jit
def _simreg_bwd_kernel(
    XQ, RQ, YQ, PQ, CQ, XK, RK, YK, PK, CK, LSE, W, INVNP, F,
    SQ, SK, H, R0, R1,
    stride_xqb, stride_xqs, stride_xkb, stride_xks, stride_fb, stride_fm,
    inv_tau,
    CHUNKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_H: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """One tile of ``F = D * r_q r_k^T / tau`` for anchor rows ``[R0, R1)`` (metadata as in the forward)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_b = tl.program_id(2)
    bb = pid_b.to(tl.int64)
    offs_m = R0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < R1
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < SK
    offs_k = tl.arange(0, BLOCK_K)

    w = tl.load(W + bb * SQ + offs_m, mask=m_mask, other=0.0)  # g / tau on anchors, else 0
    pq = tl.load(PQ + bb * SQ + offs_m, mask=m_mask, other=-1)
    pk = tl.load(PK + bb * SK + offs_n, mask=n_mask, other=-1)
    active = (pq >= 0) & (w != 0.0)
    vk = pk >= 0
    # Skip the similarity tile when no pair in it can contribute.
    work = (tl.max(active.to(tl.int32), 0) > 0) & (tl.max(vk.to(tl.int32), 0) > 0)
    if CHUNKED:
        cq = tl.load(CQ + bb * SQ + offs_m, mask=m_mask, other=-1)
        ck = tl.load(CK + bb * SK + offs_n, mask=n_mask, other=-1)
        big = 2147483647
        work = work & (tl.min(tl.where(active, cq, big), 0) <= tl.max(tl.where(vk, ck, -1), 0))
        work = work & (tl.min(tl.where(vk, ck, big), 0) <= tl.max(tl.where(active, cq, -1), 0))
    h_end = tl.where(work, H, 0)

    xq_ptrs = XQ + bb * stride_xqb + offs_m[:, None] * stride_xqs + offs_k[None, :]
    xk_ptrs = XK + bb * stride_xkb + offs_n[:, None] * stride_xks + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for h0 in range(0, h_end, BLOCK_K):
        if EVEN_H:
            q = tl.load(xq_ptrs + h0, mask=m_mask[:, None], other=0.0)
            k = tl.load(xk_ptrs + h0, mask=n_mask[:, None], other=0.0)
        else:
            h_mask = (h0 + offs_k) < H
            q = tl.load(xq_ptrs + h0, mask=m_mask[:, None] & h_mask[None, :], other=0.0)
            k = tl.load(xk_ptrs + h0, mask=n_mask[:, None] & h_mask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=PREC)

    lse2 = tl.load(LSE + bb * SQ + offs_m, mask=m_mask, other=0.0) * LOG2E
    inv_np = tl.load(INVNP + bb * SQ + offs_m, mask=m_mask, other=0.0)
    yq = tl.load(YQ + bb * SQ + offs_m, mask=m_mask, other=0)
    rq = tl.load(RQ + bb * SQ + offs_m, mask=m_mask, other=0.0)
    yk = tl.load(YK + bb * SK + offs_n, mask=n_mask, other=0)
    rk = tl.load(RK + bb * SK + offs_n, mask=n_mask, other=0.0)
    allowed = active[:, None] & vk[None, :] & (pq[:, None] != pk[None, :])
    if CHUNKED:
        allowed = allowed & (cq[:, None] == ck[None, :])
    scale = rq[:, None] * rk[None, :]
    p = tl.exp2(tl.where(allowed, acc * scale * (inv_tau * LOG2E) - lse2[:, None], float("-inf")))
    d = p - tl.where(allowed & (yq[:, None] == yk[None, :]), inv_np[:, None], 0.0)
    f = d * (w[:, None] * scale)
    f_ptrs = F + bb * stride_fb + (offs_m - R0)[:, None] * stride_fm + offs_n[None, :]
    tl.store(f_ptrs, f.to(F.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_BMM_OUT_DTYPE_OK = [None]  # whether torch.bmm(..., out_dtype=float32) works here


def _bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result (fp32 accumulation, no bf16 rounding of the output)."""
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    if a.is_cuda and _BMM_OUT_DTYPE_OK[0] is not False:
        try:
            out = torch.bmm(a, b, out_dtype=torch.float32)
            _BMM_OUT_DTYPE_OK[0] = True
            return out
        except (TypeError, RuntimeError):
            _BMM_OUT_DTYPE_OK[0] = False
    if a.is_cuda:  # older torch: a bf16 result, rounded once per slab
        return torch.bmm(a, b).float()
    return torch.bmm(a.float(), b.float())


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: 3xTF32 (close to fp32 accuracy) unless TF32 matmuls are allowed.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def _config(table: dict, dtype: torch.dtype, overrides: dict) -> dict:
    cfg = dict(table[2 if dtype in (torch.bfloat16, torch.float16) else 4])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def _inverse_norms(x: torch.Tensor, norm_eps: Optional[float]):
    """fp32 ``1 / max(||x||, eps)`` per row and whether the norm was above eps (ones without eps)."""
    if norm_eps is None:
        return torch.ones(x.shape[:2], device=x.device, dtype=torch.float32), None
    norms = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
    return 1.0 / norms.clamp_min(norm_eps), norms > norm_eps


def _metadata(labels: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, chunk_size: Optional[int],
              docs: Optional[torch.Tensor]):
    """int32 ``[b, s]`` labels, positions (-1 where invalid) and segment ids (-1 where invalid; see the module
    docstring), the latter only with chunks or documents."""
    b, s = labels.shape
    pos = positions.to(device=labels.device, dtype=torch.int64).view(1, s)
    p = torch.where(valid, pos, -1).to(torch.int32).contiguous()
    if chunk_size is None and docs is None:
        c = p  # never read by the kernels (CHUNKED=False)
    else:
        seg = (pos // chunk_size if chunk_size is not None else 0) + (docs if docs is not None else 0)
        c = torch.where(valid, seg, -1).to(torch.int32).contiguous()
    return labels.to(torch.int32).contiguous(), p, c


class TritonSimReg(torch.autograd.Function):
    """Inputs as :func:`triton_simreg` (``xk=None``: self keys); returns ``(per_token, anchors)``."""

    @staticmethod
    def forward(ctx, xq, xk, yq, yk, vq, vk, pq, pk, dq, dk, temperature, chunk_size, norm_eps, fwd_over, bwd_over):
        self_keys = xk is None
        if xq.stride(-1) != 1:
            xq = xq.contiguous()
        rq, unclamped = _inverse_norms(xq, norm_eps)
        segmented = chunk_size is not None or dq is not None
        yq, pq, cq = _metadata(yq, vq, pq, chunk_size, dq)
        unclamped_k = None
        if self_keys:
            xk, yk, pk, ck, rk = xq, yq, pq, cq, rq
        else:
            if xk.stride(-1) != 1:
                xk = xk.contiguous()
            rk, unclamped_k = _inverse_norms(xk, norm_eps)
            yk, pk, ck = _metadata(yk, vk, pk, chunk_size, dk)
        b, sq, h = xq.shape
        sk = xk.shape[1]
        cfg = _config(FWD_CONFIG, xq.dtype, fwd_over)
        bm, bn = cfg["block_m"], cfg["block_n"]
        splits = cfg.get("num_splits")
        if splits is None:
            splits = 1
            if xq.is_cuda:
                programs = triton.cdiv(sq, bm) * b
                splits = max(1, min(triton.cdiv(sk, bn), round(2 * _sm_count(xq.device.index or 0) / programs)))
        lse = torch.empty(splits, b, sq, device=xq.device, dtype=torch.float32)
        psum = torch.empty_like(lse)
        npos = torch.empty(splits, b, sq, device=xq.device, dtype=torch.int32)
        inv_tau = 1.0 / float(temperature)
        LAST_LAUNCH["fwd"] = _simreg_fwd_kernel[(triton.cdiv(sq, bm), splits, b)](
            xq, rq, yq, pq, cq, xk, rk, yk, pk, ck, lse, psum, npos,
            sq, sk, h, xq.stride(0), xq.stride(1), xk.stride(0), xk.stride(1),
            inv_tau,
            CHUNKED=segmented, SPLITS=splits,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["block_k"],
            EVEN_H=h % cfg["block_k"] == 0, UPCAST=not xq.is_cuda, PREC=_precision(xq.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        if splits == 1:
            lse, psum, npos = lse[0], psum[0], npos[0]
        else:
            lse, psum, npos = torch.logsumexp(lse, 0), psum.sum(0), npos.sum(0)
        anchors = npos > 0
        lse = torch.where(anchors, lse, 0.0)
        per_token = torch.where(anchors, lse - psum / npos.clamp_min(1), 0.0)
        ctx.self_keys = self_keys
        ctx.args = (temperature, segmented, norm_eps, bwd_over)
        keys = (None,) * 5 if self_keys else (xk, rk, yk, pk, ck)
        ctx.save_for_backward(xq, rq, yq, pq, cq, *keys, unclamped, unclamped_k, lse, npos, anchors)
        ctx.mark_non_differentiable(anchors)
        return per_token, anchors

    @staticmethod
    def backward(ctx, grad_per_token, _grad_anchors):
        xq, rq, yq, pq, cq, xk, rk, yk, pk, ck, unclamped, unclamped_k, lse, npos, anchors = ctx.saved_tensors
        temperature, segmented, norm_eps, bwd_over = ctx.args
        if ctx.self_keys:
            xk, rk, yk, pk, ck = xq, rq, yq, pq, cq
        b, sq, h = xq.shape
        sk = xk.shape[1]
        inv_tau = 1.0 / float(temperature)
        w = (torch.where(anchors, grad_per_token.float(), 0.0) * inv_tau).contiguous()
        inv_np = (1.0 / npos.clamp_min(1).float()).contiguous()
        cfg = _config(BWD_CONFIG, xq.dtype, bwd_over)
        bm, bn = cfg["block_m"], cfg["block_n"]
        # bf16 keeps the slab and the GEMMs in bf16; fp16 would underflow (F is
        # ~g/(tau*s)), so fp16 and fp32 use fp32 GEMMs.
        buf_dtype = torch.bfloat16 if xq.dtype == torch.bfloat16 else torch.float32
        xq_mm = xq if xq.dtype == buf_dtype else xq.to(buf_dtype)
        xk_mm = xq_mm if ctx.self_keys else (xk if xk.dtype == buf_dtype else xk.to(buf_dtype))
        rows = cfg.get("slab_rows")
        if rows is None:
            budget = max(b * sq * h, SLAB_MIN_ELEMS)
            rows = max(bm, budget // (b * sk) // bm * bm)
        rows = min(rows, sq)
        u_q = torch.zeros(b, sq, h, device=xq.device, dtype=torch.float32)
        u_k = u_q if ctx.self_keys else torch.zeros(b, sk, h, device=xk.device, dtype=torch.float32)
        for r0 in range(0, sq, rows):
            r1 = min(r0 + rows, sq)
            slab = torch.empty(b, r1 - r0, sk, device=xq.device, dtype=buf_dtype)
            LAST_LAUNCH["bwd"] = _simreg_bwd_kernel[(triton.cdiv(r1 - r0, bm), triton.cdiv(sk, bn), b)](
                xq, rq, yq, pq, cq, xk, rk, yk, pk, ck, lse, w, inv_np, slab,
                sq, sk, h, r0, r1,
                xq.stride(0), xq.stride(1), xk.stride(0), xk.stride(1), slab.stride(0), slab.stride(1),
                inv_tau,
                CHUNKED=segmented,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["block_k"],
                EVEN_H=h % cfg["block_k"] == 0, UPCAST=not xq.is_cuda, PREC=_precision(xq.dtype),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )
            u_q[:, r0:r1] += _bmm_f32(slab, xk_mm)                   # r_i dz_i
            u_k += _bmm_f32(slab.transpose(1, 2), xq_mm[:, r0:r1])   # r_j dz_j
            del slab
        if norm_eps is not None:
            _normalize_backward_(u_q, xq, rq, unclamped, rows)
            if not ctx.self_keys:
                _normalize_backward_(u_k, xk, rk, unclamped_k, rows)
        grad_q = u_q.to(xq.dtype)
        grad_k = None if ctx.self_keys else u_k.to(xk.dtype)
        return grad_q, grad_k, *([None] * 13)


def _normalize_backward_(u: torch.Tensor, x: torch.Tensor, r: torch.Tensor, unclamped: torch.Tensor, rows: int):
    """In place, ``rows`` rows at a time (an fp32 copy of x per slab): ``u - r^2 x (x . u)``.

    ``u = r dz`` ``[b, s, h]`` fp32 is the gradient of the normalized state
    times ``r``; the result is ``dh``. Where the norm was clamped to eps it is
    just ``u``.
    """
    for r0 in range(0, x.shape[1], rows):
        r1 = min(r0 + rows, x.shape[1])
        xs = x[:, r0:r1].float()
        coef = torch.where(unclamped[:, r0:r1], (xs * u[:, r0:r1]).sum(-1) * r[:, r0:r1] ** 2, 0.0)
        u[:, r0:r1].addcmul_(xs, coef.unsqueeze(-1), value=-1.0)


def triton_simreg(
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
    norm_eps: Optional[float] = None,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    block_k: Optional[int] = None,
    num_splits: Optional[int] = None,
    slab_rows: Optional[int] = None,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
    dq: Optional[torch.Tensor] = None,
    dk: Optional[torch.Tensor] = None,
):
    """Fused SimReg; arguments and result as :func:`blockwise_simreg`.

    ``zq``/``zk`` may be bf16, fp16 or fp32 (fp32 accumulation throughout);
    pass the same tensors for self keys (one gradient then serves both roles).
    ``norm_eps``: ``zq`` and ``zk`` hold raw states, normalized inside as
    ``h / max(||h||, norm_eps)``. ``contiguous=True`` promises
    ``pq == pk == arange`` (chunked mode then runs chunk by chunk).
    The remaining keywords override the launch configuration (tests use small
    blocks): ``block_m``/``block_n``/``block_k``, ``num_splits`` (forward key
    splits), ``slab_rows`` (backward rows per slab), ``num_warps``,
    ``num_stages``. Returns ``(per_token [b, sq] fp32, anchors [b, sq] bool)``.
    """
    if zq.dtype not in SUPPORTED_DTYPES or zk.dtype != zq.dtype:
        raise ValueError(f'impl="triton" supports fp32, bf16 and fp16 states (the same for anchors and keys), '
                         f"got {zq.dtype} and {zk.dtype}; use impl=\"blockwise\" or \"naive\" for others")
    if not zq.is_cuda:
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError('impl="triton" needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, '
                             "for Triton's slow CPU interpreter); use impl=\"blockwise\" on CPU")
    self_keys = zk is zq and yk is yq and vk is vq and pk is pq and dk is dq
    fwd_over = dict(block_m=block_m, block_n=block_n, block_k=block_k, num_splits=num_splits,
                    num_warps=num_warps, num_stages=num_stages)
    bwd_over = dict(block_m=block_m, block_n=block_n, block_k=block_k, slab_rows=slab_rows,
                    num_warps=num_warps, num_stages=num_stages)

    def run(x, y, v, p, d, chunk, keys=(None,) * 5):  # keys: (x, y, v, p, d) of separate keys
        xk_, yk_, vk_, pk_, dk_ = keys
        return TritonSimReg.apply(x, xk_, y, yk_, v, vk_, p, pk_, d, dk_, temperature, chunk, norm_eps, fwd_over,
                                  bwd_over)

    def rows(t, a, z, shape):  # a slice of a [b, s] tensor, reshaped; None stays None
        return None if t is None else t[:, a:z].reshape(shape)

    b, s, h = zq.shape
    if contiguous and self_keys and chunk_size is not None and chunk_size < s and b * (s // chunk_size) <= 65535:
        # Independent chunks: a batch of [b * n, c, h] plus the tail chunk.
        n, c = s // chunk_size, chunk_size
        main = n * c
        pos = torch.arange(c, device=zq.device)
        per_token, anchors = run(zq[:, :main].reshape(b * n, c, h), yq[:, :main].reshape(b * n, c),
                                 vq[:, :main].reshape(b * n, c), pos, rows(dq, 0, main, (b * n, c)), None)
        per_token, anchors = per_token.reshape(b, main), anchors.reshape(b, main)
        if main < s:
            tail = torch.arange(s - main, device=zq.device)
            pt, at = run(zq[:, main:], yq[:, main:], vq[:, main:], tail, rows(dq, main, s, (b, s - main)), None)
            per_token, anchors = torch.cat([per_token, pt], 1), torch.cat([anchors, at], 1)
        return per_token, anchors
    if contiguous and chunk_size is not None and chunk_size >= s:
        chunk_size = None  # one chunk holds the whole sequence
    if self_keys:
        return run(zq, yq, vq, pq, dq, chunk_size)
    return run(zq, yq, vq, pq, dq, chunk_size, keys=(zk, yk, vk, pk, dk))
