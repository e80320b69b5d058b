"""SimReg and JREG sums on one rank of a tensor/sequence/context-parallel layout.

Megatron layouts (all positions are in the full sequence of length ``s``):

* Context parallelism splits the sequence into ``2 * cp`` chunks; CP rank
  ``r`` holds chunks ``r`` and ``2cp - 1 - r`` (zigzag, for causal-attention
  load balance). Labels and masks on a CP rank are ``[b, s / cp]`` in that
  order.
* Sequence parallelism then splits the CP-local sequence into ``tp``
  contiguous parts: hidden states are ``[s / (cp * tp), b, h]`` on each TP
  rank. Without SP every TP rank holds the whole CP-local ``[s / cp, b, h]``.

Modes (``SimRegConfig.mode``):

* ``"exact"``: each rank's anchors are its local tokens; keys are the whole
  sequence, gathered across TP (under SP) and CP with an all-gather whose
  backward is a reduce-scatter, so every key receives the gradient of every
  rank's anchors exactly once. Summing the local loss sums and anchor counts
  over the TP x CP group gives the single-process loss.
  Without SP, every TP rank holds the same states and computes the same
  (CP-local-anchor) loss redundantly; the gradient it adds to its replicated
  activations is then already the full one, and only CP is reduced.
* ``"shard_local"``: anchors and keys stay within the rank's shard (each
  contiguous run of local positions: one under SP without CP, two zigzag
  chunks under CP). No hidden states are communicated. This *changes the
  objective*: it is SimReg-Chunk with the shard as the chunk (intersected
  with ``chunk_size`` when set), so pairs across shards are neither pulled
  nor pushed, and the value depends on the TP/CP layout.

Document scope (``SimRegConfig.scope="document"``) needs each token's
document, a prefix count of EOD labels over the *whole* sequence: under CP the
labels are all-gathered (integers, no gradient) and put back in position order
first, so a document that spans shards keeps one id on every rank.
"""

from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional

import torch
import torch.distributed as dist

from ..config import SimRegConfig
from ..losses.simreg import NORM_EPS, SimRegTerms, count_anchors, document_ids, simreg_per_token, valid_tokens


def zigzag_positions(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Positions ``[s / cp]`` held by CP rank ``cp_rank`` in Megatron's zigzag layout."""
    if seq_len % (2 * cp_size):
        raise ValueError(f"seq_len={seq_len} must be divisible by 2 * context_parallel_size = {2 * cp_size}")
    if cp_size == 1:
        return torch.arange(seq_len, device=device)
    c = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c, device=device)
    return torch.cat([first, second])


class ShardLayout(NamedTuple):
    """Where this rank's hidden states sit. ``None`` groups mean size 1."""

    tp_group: Optional[dist.ProcessGroup]
    cp_group: Optional[dist.ProcessGroup]
    sequence_parallel: bool

    @staticmethod
    def _size(group):
        return 1 if group is None else dist.get_world_size(group)

    @staticmethod
    def _rank(group):
        return 0 if group is None else dist.get_rank(group)

    @property
    def tp(self):
        return self._size(self.tp_group)

    @property
    def cp(self):
        return self._size(self.cp_group)

    def local_slice(self, cp_local_len: int) -> slice:
        """Slice of the CP-local sequence whose hidden states this rank holds."""
        if not self.sequence_parallel or self.tp == 1:
            return slice(0, cp_local_len)
        if cp_local_len % self.tp:
            raise ValueError(f"sequence length per CP rank ({cp_local_len}) must be divisible by tp={self.tp} under SP")
        n = cp_local_len // self.tp
        r = self._rank(self.tp_group)
        return slice(r * n, (r + 1) * n)

    def reduce_groups(self) -> List[dist.ProcessGroup]:
        """Groups over which local sums add up to the whole sequence's."""
        groups = [self.cp_group] if self.cp > 1 else []
        if self.sequence_parallel and self.tp > 1:
            groups.append(self.tp_group)
        return groups


def _all_gather_seq(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """All-gather a tensor without gradient along ``dim`` (labels, masks, positions)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _shard_runs(local: slice, s_cp: int, cp: int) -> List[slice]:
    """This rank's runs of consecutive positions within one zigzag chunk, as slices of its local tokens.

    The CP-local sequence is two zigzag chunks of ``s_cp / 2`` (one chunk
    without CP); ``local`` is the part this rank holds. Computed from sizes
    alone: reading position values would wait for the device on a GPU.
    """
    bounds = [0, s_cp // 2, s_cp] if cp > 1 else [0, s_cp]
    runs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        lo, hi = max(a, local.start), min(b, local.stop)
        if lo < hi:
            runs.append(slice(lo - local.start, hi - local.start))
    return runs


def _layout_documents(labels: torch.Tensor, cp_pos: torch.Tensor, config: SimRegConfig, layout: ShardLayout):
    """``(this CP rank's document ids [b, s / cp], every CP rank's [b, s] in all-gather order)``, or ``(None, None)``
    for sequence scope. The second is what exact mode's gathered keys need, so they cost no further all-gather."""
    if config.scope != "document":
        return None, None
    if layout.cp == 1:
        docs = document_ids(labels, config.eod_id)
        return docs, docs
    every_label = _all_gather_seq(labels, layout.cp_group, dim=1)
    every_pos = _all_gather_seq(cp_pos, layout.cp_group, dim=0)
    in_order = torch.empty_like(every_label)
    in_order[:, every_pos] = every_label
    docs = document_ids(in_order, config.eod_id)
    return docs[:, cp_pos], docs[:, every_pos]


def parallel_simreg_terms(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: Optional[torch.Tensor],
    config: SimRegConfig,
    layout: ShardLayout,
    *,
    ignore_index: int = -100,
) -> SimRegTerms:
    """SimReg terms for this rank's anchors.

    Args:
        hidden: ``[s_local, b, h]`` in Megatron's sequence-first layout (after
            the SP scatter: ``s_local = s / (cp * tp)`` under SP, ``s / cp``
            otherwise).
        labels, loss_mask: ``[b, s / cp]``, this CP rank's labels (full across TP).

    Returns per-token terms ``[b, s_local]`` of the local anchors. Sum
    ``loss_sum`` and ``num_anchors`` over ``layout.reduce_groups()`` for the
    whole sequence's values.
    """
    b, s_cp = labels.shape
    cp_rank = layout._rank(layout.cp_group)
    cp_pos = zigzag_positions(s_cp * layout.cp, layout.cp, cp_rank, device=labels.device)
    local = layout.local_slice(s_cp)
    if hidden.shape[0] != local.stop - local.start or hidden.shape[1] != b:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} does not match this rank's share [s_local={local.stop - local.start}, b={b}, h] "
            f"of labels {tuple(labels.shape)} (tp={layout.tp}, cp={layout.cp}, sequence_parallel={layout.sequence_parallel})"
        )
    valid = valid_tokens(labels, loss_mask, ignore_index)
    docs, gathered_docs = _layout_documents(labels, cp_pos, config, layout)
    dq = None if docs is None else docs[:, local]
    # Raw states: each implementation normalizes them itself (Triton in their own dtype: bf16 dots for bf16 models).
    xq, yq, vq, pq = hidden.transpose(0, 1), labels[:, local], valid[:, local], cp_pos[local]
    kw = dict(temperature=config.temperature, chunk_size=config.chunk_size, impl=config.impl, norm_eps=NORM_EPS)

    if config.mode == "shard_local":
        runs = _shard_runs(local, s_cp, layout.cp)
        parts = [simreg_per_token(xq[:, r], yq[:, r], vq[:, r], q_positions=pq[r],
                                  q_docs=None if dq is None else dq[:, r], **kw) for r in runs]
        return SimRegTerms(torch.cat([p.per_token for p in parts], 1), torch.cat([p.anchors for p in parts], 1))

    sp_split = layout.sequence_parallel and layout.tp > 1
    if not sp_split and layout.cp == 1:
        # This rank holds the whole sequence in order: the anchors are their own keys.
        return simreg_per_token(xq, yq, vq, q_docs=dq, **kw)

    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    xk, yk, vk, pk = hidden, labels, valid, cp_pos
    if sp_split:
        # backward = reduce-scatter: each key gets the sum over all ranks' anchors
        xk = gather_from_sequence_parallel_region(xk, tensor_parallel_output_grad=True, group=layout.tp_group)
    if layout.cp > 1:
        xk = gather_from_sequence_parallel_region(xk, tensor_parallel_output_grad=True, group=layout.cp_group)
        yk = _all_gather_seq(yk, layout.cp_group, dim=1)
        vk = _all_gather_seq(vk, layout.cp_group, dim=1)
        pk = _all_gather_seq(pk, layout.cp_group, dim=0)
    return simreg_per_token(xq, yq, vq, keys=(xk.transpose(0, 1), yk, vk), q_positions=pq, k_positions=pk,
                            q_docs=dq, k_docs=gathered_docs, **kw)


def pairing_segments(seq_len: int, config: SimRegConfig, tp: int = 1, cp: int = 1, sequence_parallel: bool = False):
    """``[s]``: the segment of each position; SimReg pairs positions only within a segment.

    ``chunk_size`` splits the sequence into chunks; ``shard_local`` further
    splits it into the ranks' shards (one per zigzag chunk and SP rank).
    """
    pos = torch.arange(seq_len)
    seg = pos // config.chunk_size if config.chunk_size else torch.zeros_like(pos)
    if config.mode == "shard_local":
        shard = torch.empty_like(pos)
        s_cp = seq_len // cp
        parts = tp if sequence_parallel else 1
        for r in range(cp):
            cp_pos = zigzag_positions(seq_len, cp, r)
            local_index = torch.arange(s_cp)
            zig = local_index // (s_cp // 2) if cp > 1 else torch.zeros_like(local_index)
            shard[cp_pos] = (r * 2 + zig) * parts + local_index // (s_cp // parts)
        seg = seg * (2 * cp * parts) + shard
    return seg


def count_step_anchors(labels, loss_masks=None, config: Optional[SimRegConfig] = None, *, tp: int = 1, cp: int = 1,
                       sequence_parallel: bool = False, ignore_index: int = -100) -> torch.Tensor:
    """SimReg anchors of a batch given as full sequences, for ``begin_step``.

    ``labels``: a ``[b, s]`` tensor or a list of them (one per micro-batch),
    in natural position order; ``loss_masks`` likewise or ``None``. Returns a
    0-dim int64 tensor on the labels' device (GPU labels: no host sync). Sum
    the result over data-parallel ranks for the global batch.
    """
    config = config or SimRegConfig()
    labels = labels if isinstance(labels, (list, tuple)) else [labels]
    masks = loss_masks if isinstance(loss_masks, (list, tuple)) else [loss_masks] * len(labels)
    total = 0
    for y, m in zip(labels, masks):
        seg = _device_segments(y.shape[1], config.chunk_size, config.mode, tp, cp, sequence_parallel, y.device)
        if config.scope == "document":
            seg = _runs(seg, document_ids(y, config.eod_id))
        total = total + count_anchors(y, valid_tokens(y, m, ignore_index), seg)
    return total


def _runs(segments: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """``[b, s]``: a new id wherever the segment ``[s]`` or the document ``[b, s]`` changes along the row.

    Equal ids then mean the same segment *and* document, because every segment
    (chunk, shard) and every document is one run of consecutive positions.
    """
    change = (segments[1:] != segments[:-1])[None, :] | (docs[:, 1:] != docs[:, :-1])
    return torch.cat([torch.zeros_like(docs[:, :1]), change.to(torch.int64).cumsum(1)], 1)


@functools.lru_cache(maxsize=32)
def _device_segments(seq_len, chunk_size, mode, tp, cp, sequence_parallel, device) -> torch.Tensor:
    # Cached on the labels' device: a host-to-device copy every step would synchronize.
    config = SimRegConfig(chunk_size=chunk_size, mode=mode)
    return pairing_segments(seq_len, config, tp, cp, sequence_parallel).to(device)
