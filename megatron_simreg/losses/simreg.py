r"""SimReg: embedding similarity regularization (arXiv 2605.08809).

No official code exists; this module *is* the project's specification.

Symbols
-------
``H`` ``[b, s, h]``  hidden states (by default the final norm's output, the
                     representation the LM head classifies).
``Y`` ``[b, s]``     next-token labels; ``ignore_index`` (default -100) marks
                     positions without a label.
``M`` ``[b, s]``     optional ``loss_mask``; a token is *valid* when
                     ``M == 1`` (bool ``True``) and ``Y != ignore_index``.
``tau``              temperature (> 0).
``c``                optional ``chunk_size`` (SimReg-Chunk).
``D`` ``[b, s]``     optional document of each position in a packed sequence
                     (``scope="document"``, from :func:`document_ids`).

Definition
----------
``z_i = h_i / max(||h_i||, eps)``, computed in fp32 whatever the input dtype
(float64 stays float64).

For each valid anchor ``i`` of a sequence:

* ``A(i)`` = valid ``j != i`` in the same sequence (and in the same chunk,
  ``floor(i / c) == floor(j / c)``, when ``c`` is set; and in the same
  document, ``D_i == D_j``, with ``scope="document"``);
* ``P(i) = {j in A(i) : y_j == y_i}``; only anchors with ``|P(i)| >= 1`` count;
* ``l_i = -(1/|P(i)|) * sum_{p in P(i)} log( exp(z_i.z_p/tau) / sum_{a in A(i)} exp(z_i.z_a/tau) )``
  ``    = logsumexp_{a in A(i)}(z_i.z_a/tau) - mean_{p in P(i)}(z_i.z_p/tau)``.

Reductions: ``"mean"`` = ``sum_i l_i / #anchors`` (exactly 0, with zero
gradients, when there is no anchor), ``"sum"``, ``"none"`` (``[b, s]``, 0 where
the token is not a counted anchor). Training objective:
``L = L_LM + lambda * L_SimReg``.

Implementations
---------------
``"naive"``      materializes the ``[b, s, s]`` similarities: the readable
                 reference.
``"blockwise"``  :mod:`.simreg_blockwise`, never holds an ``s x s`` matrix.
``"triton"``     :mod:`megatron_simreg.kernels.simreg_triton`, fused Triton
                 kernels (CUDA; needs the ``triton`` package).
``"auto"``       triton for CUDA tensors when triton is installed; otherwise
                 naive below ``AUTO_BLOCKWISE_MIN_KEYS`` keys, blockwise from
                 there on.
"""

from __future__ import annotations

import importlib.util
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..config import SIMREG_IMPLS, check_choice, check_chunk_size, check_scope, check_temperature
from .simreg_blockwise import blockwise_simreg, similarity_tile

NORM_EPS = 1e-8
# At 2048 keys the naive [b, s, s] fp32 tensors start to cost tens of MB per
# sequence, and blockwise is within a few percent of naive's speed on CPU
# (docs/performance.md).
AUTO_BLOCKWISE_MIN_KEYS = 2048
REDUCTIONS = ("mean", "sum", "none")


class SimRegTerms(NamedTuple):
    """Unreduced SimReg output.

    ``per_token`` ``[b, s]``: ``l_i`` for counted anchors, 0 elsewhere.
    ``anchors`` ``[b, s]`` bool: which tokens are counted anchors.
    Distributed callers all-reduce ``loss_sum`` and ``num_anchors`` and divide.
    """

    per_token: torch.Tensor
    anchors: torch.Tensor

    @property
    def loss_sum(self) -> torch.Tensor:
        return self.per_token.sum()

    @property
    def num_anchors(self) -> torch.Tensor:
        return self.anchors.sum()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize(hidden: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """``z = h / max(||h||, eps)`` along the last dim, in fp32 (float64 kept)."""
    return F.normalize(hidden.to(compute_dtype(hidden.dtype)), dim=-1, eps=eps)


def valid_tokens(labels: torch.Tensor, loss_mask: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    """``[b, s]`` bool: ``loss_mask == 1`` and ``labels != ignore_index``."""
    valid = labels != ignore_index
    if loss_mask is not None:
        valid = valid & (loss_mask if loss_mask.dtype == torch.bool else loss_mask == 1)
    return valid


def document_ids(labels: torch.Tensor, eod_id: int) -> torch.Tensor:
    """``[b, s]`` int64: the document of each position of a packed sequence, numbered from 0 in each row.

    Megatron's convention (``--reset-position-ids``, ``--reset-attention-mask``):
    a document runs through the position whose *input* is its EOD token, and
    the next document starts one position later. The input at ``i`` is
    ``labels[i - 1]``, so position ``i`` lies in document
    ``#{j <= i - 2 : labels[j] == eod_id}``. Labels alone decide it because
    the last pipeline stage, where SimReg runs, has no input tokens; so the one
    case that differs from the reset masks is a sequence whose *first* input is
    EOD: its position 0 counts in the first document, not in one of its own.
    The ids are non-decreasing along the sequence.
    """
    ends = (labels == eod_id).to(torch.int64).cumsum(1)
    docs = torch.zeros_like(ends)
    docs[:, 2:] = ends[:, :-2]
    return docs


def check_inputs(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: Optional[torch.Tensor],
    *,
    ignore_index: int,
    vocab_size: Optional[int] = None,
    debug: bool = False,
) -> None:
    """Raise ``ValueError`` naming the argument and the expected form.

    Shape and dtype checks are free. Value checks (label range, NaN/Inf) read
    tensor contents, which on GPU costs a device sync, so they run on CPU
    tensors always and on GPU tensors only with ``debug=True``.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(
            "hidden must be a floating-point tensor of shape [b, s, h], got "
            + (f"{tuple(hidden.shape)} {hidden.dtype}" if isinstance(hidden, torch.Tensor) else repr(type(hidden)))
        )
    if hidden.numel() == 0:
        raise ValueError(f"hidden must be non-empty, got shape {tuple(hidden.shape)} [b, s, h]")
    b, s, _ = hidden.shape
    if (not isinstance(labels, torch.Tensor) or labels.shape != (b, s) or labels.is_floating_point()
            or labels.dtype == torch.bool):
        raise ValueError(
            f"labels must be an integer tensor of shape [b, s] = [{b}, {s}] matching hidden, got "
            + (f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, torch.Tensor) else repr(type(labels)))
        )
    if loss_mask is not None and (not isinstance(loss_mask, torch.Tensor) or loss_mask.shape != (b, s)):
        raise ValueError(
            f"loss_mask must be None or a tensor of shape [b, s] = [{b}, {s}], got "
            + (f"{tuple(loss_mask.shape)}" if isinstance(loss_mask, torch.Tensor) else repr(type(loss_mask)))
        )
    if labels.device != hidden.device or (loss_mask is not None and loss_mask.device != hidden.device):
        raise ValueError(f"hidden, labels and loss_mask must be on one device, got {hidden.device}, {labels.device}"
                         + (f", {loss_mask.device}" if loss_mask is not None else ""))
    if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size <= 0):
        raise ValueError(f"vocab_size must be None or an int > 0, got {vocab_size!r}")
    if debug or labels.device.type == "cpu":
        real = labels[labels != ignore_index]
        if real.numel() and (real.min() < 0 or (vocab_size is not None and real.max() >= vocab_size)):
            upper = vocab_size if vocab_size is not None else "vocab"
            raise ValueError(
                f"labels must lie in [0, {upper}) or equal ignore_index={ignore_index}; "
                f"got values in [{int(real.min())}, {int(real.max())}]"
            )
    if debug and not torch.isfinite(hidden).all():
        raise ValueError("hidden contains NaN or Inf (found by debug=True)")


def count_anchors(labels: torch.Tensor, valid: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Number of SimReg anchors, from labels alone (no hidden states needed).

    ``labels``/``valid`` ``[b, s]``; ``segments`` ``[s]`` or ``[b, s]``
    (values below 2**31): positions may only pair within one segment (all
    zeros for whole sequences, ``pos // c`` for chunks). A valid token is an
    anchor iff another valid token of its row and segment has the same label.
    Callers use it to know a global batch's anchor count before any forward
    pass.

    Returns a 0-dim int64 tensor on the labels' device. It sorts one int64
    key per token, ``segment << 32 | label``, and counts tokens whose sorted
    neighbour has the same key: fixed shapes, so no host sync on GPU, and
    ~100x faster on CPU than ``torch.unique(dim=0)`` (1.3 s -> 8 ms for
    64 x 4096 labels).
    """
    b, s = labels.shape
    key = (segments.to(labels.device, torch.int64).expand(b, s) << 32) | labels.to(torch.int64)
    # invalid tokens get distinct negative keys: they never match, and are not counted
    key = torch.where(valid, key, -1 - torch.arange(s, device=labels.device)).sort(dim=1).values
    same = key[:, 1:] == key[:, :-1]
    edge = torch.zeros(b, 1, dtype=torch.bool, device=labels.device)
    has_twin = torch.cat([edge, same], 1) | torch.cat([same, edge], 1)
    return (has_twin & (key >= 0)).sum()


def naive_simreg(
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
    dq: Optional[torch.Tensor] = None,
    dk: Optional[torch.Tensor] = None,
) -> SimRegTerms:
    """Reference implementation on normalized states; builds ``[b, sq, sk]``.

    ``zq`` ``[b, sq, h]`` anchors, ``zk`` ``[b, sk, h]`` keys (the same tensor
    in the single-process case), ``y*``/``v*`` ``[b, s*]`` labels and validity,
    ``p*`` ``[s*]`` positions in the sequence (self-exclusion and chunks are
    decided by position, so sharded or zigzag layouts work unchanged),
    ``d*`` ``[b, s*]`` optional document ids (pairs need equal ids).
    """
    sim, allowed, positive = similarity_tile(zq, yq, vq, pq, zk, yk, vk, pk, temperature, chunk_size, dq, dk)
    num_pos = positive.sum(-1)
    anchors = num_pos > 0
    # Rows that are not anchors may have no allowed key at all; give them a
    # finite dummy row so logsumexp and its gradient stay finite.
    logits = torch.where(anchors[..., None], sim.masked_fill(~allowed, float("-inf")), 0.0)
    lse = torch.logsumexp(logits, dim=-1)
    pos_mean = sim.masked_fill(~positive, 0.0).sum(-1) / num_pos.clamp_min(1)
    per_token = torch.where(anchors, lse - pos_mean, 0.0)
    return SimRegTerms(per_token, anchors)


def triton_usable(states: torch.Tensor) -> bool:
    """Whether ``impl="auto"`` takes the Triton kernel: CUDA fp32/bf16/fp16 states and triton installed."""
    return (states.is_cuda and states.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and importlib.util.find_spec("triton") is not None)


def load_triton_simreg():
    try:
        from ..kernels.simreg_triton import triton_simreg
    except ImportError as e:
        raise ImportError(f'impl="triton" needs the triton package, which could not be imported ({e}); install it '
                          'with `pip install triton` (CUDA builds of torch ship it), or use impl="blockwise"') from e
    return triton_simreg


def resolve_impl(impl: str, num_keys: int, states: Optional[torch.Tensor] = None) -> str:
    if impl == "auto":
        if states is not None and triton_usable(states):
            return "triton"
        return "blockwise" if num_keys >= AUTO_BLOCKWISE_MIN_KEYS else "naive"
    return impl


def simreg_per_token(
    zq: torch.Tensor,
    yq: torch.Tensor,
    vq: torch.Tensor,
    *,
    temperature: float,
    chunk_size: Optional[int] = None,
    impl: str = "auto",
    keys: Optional[tuple] = None,
    q_positions: Optional[torch.Tensor] = None,
    k_positions: Optional[torch.Tensor] = None,
    q_docs: Optional[torch.Tensor] = None,
    k_docs: Optional[torch.Tensor] = None,
    norm_eps: Optional[float] = None,
) -> SimRegTerms:
    """Low-level entry: anchors against keys, without input checks.

    ``zq`` ``[b, sq, h]`` anchor states, ``yq`` labels and ``vq`` bool
    validity ``[b, sq]``. ``keys=(zk, yk, vk)`` gives a different key set
    (e.g. the whole sequence gathered across ranks); by default the anchors
    are their own keys, which saves a gradient buffer. ``q_positions``/
    ``k_positions`` ``[s*]`` are the tokens' positions in the full sequence
    (default ``arange``). ``q_docs``/``k_docs`` ``[b, s*]``: each token's
    document (:func:`document_ids`); only tokens of one document pair (default:
    the whole sequence is one; self keys use ``q_docs``). ``norm_eps=None``: the states are normalized
    already. ``norm_eps=eps``: they are raw hidden states, normalized as
    ``h / max(||h||, eps)`` by the implementation itself (Triton reads them
    in their own dtype, so bf16 states take bf16 tensor-core dots).
    """
    zk, yk, vk = keys if keys is not None else (zq, yq, vq)
    if keys is None:
        k_docs = q_docs
    if (q_docs is None) != (k_docs is None):
        raise ValueError("q_docs and k_docs must be given together")
    contiguous = keys is None and q_positions is None and k_positions is None
    if q_positions is None:
        q_positions = torch.arange(zq.shape[1], device=zq.device)
    if k_positions is None:
        k_positions = q_positions if keys is None else torch.arange(zk.shape[1], device=zk.device)
    which = resolve_impl(impl, zk.shape[1], zq)
    if which == "naive":
        if norm_eps is not None:
            zq = normalize(zq, norm_eps)
            zk = zq if keys is None else normalize(zk, norm_eps)
        return naive_simreg(zq, yq, vq, q_positions, zk, yk, vk, k_positions, temperature, chunk_size, q_docs, k_docs)
    if which == "triton":
        fn = load_triton_simreg()
    else:
        fn = blockwise_simreg
        zq = zq.to(compute_dtype(zq.dtype))
        zk = zq if keys is None else zk.to(compute_dtype(zk.dtype))
    per_token, anchors = fn(zq, yq, vq, q_positions, zk, yk, vk, k_positions, temperature, chunk_size,
                            contiguous=contiguous, norm_eps=norm_eps, dq=q_docs, dk=k_docs)
    return SimRegTerms(per_token, anchors)


def simreg_terms(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    *,
    temperature: float = 0.1,
    chunk_size: Optional[int] = None,
    ignore_index: int = -100,
    impl: str = "auto",
    vocab_size: Optional[int] = None,
    debug: bool = False,
    scope: str = "sequence",
    eod_id: Optional[int] = None,
) -> SimRegTerms:
    """Per-token SimReg and the anchor mask; see the module docstring.

    ``hidden`` ``[b, s, h]``, ``labels`` ``[b, s]``, ``loss_mask`` ``[b, s]``.
    """
    check_temperature(temperature)
    check_chunk_size(chunk_size)
    check_choice("impl", impl, SIMREG_IMPLS)
    check_scope(scope, eod_id)
    check_inputs(hidden, labels, loss_mask, ignore_index=ignore_index, vocab_size=vocab_size, debug=debug)
    docs = document_ids(labels, eod_id) if scope == "document" else None
    return simreg_per_token(hidden, labels, valid_tokens(labels, loss_mask, ignore_index), temperature=temperature,
                            chunk_size=chunk_size, impl=impl, q_docs=docs, norm_eps=NORM_EPS)


def simreg_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    *,
    temperature: float = 0.1,
    chunk_size: Optional[int] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    impl: str = "auto",
    vocab_size: Optional[int] = None,
    debug: bool = False,
    scope: str = "sequence",
    eod_id: Optional[int] = None,
) -> torch.Tensor:
    """SimReg loss of ``hidden`` ``[b, s, h]`` with next-token ``labels`` ``[b, s]``.

    Args:
        loss_mask: ``[b, s]``; tokens with ``loss_mask != 1`` are neither
            anchors nor keys.
        temperature: tau > 0.
        chunk_size: SimReg-Chunk window; ``None`` uses the whole sequence.
        ignore_index: label value marking positions without a label.
        reduction: ``"mean"`` (per anchor; 0 when there is none), ``"sum"``
            or ``"none"`` (``[b, s]``).
        impl: ``"auto" | "naive" | "blockwise" | "triton"``.
        vocab_size: when given, labels are checked against ``[0, vocab_size)``.
        debug: also run the value checks (label range, NaN/Inf) on GPU
            tensors, at the cost of a device sync.
        scope: ``"sequence"`` pairs any two tokens of a sequence;
            ``"document"`` only tokens of one document of a packed sequence,
            split after each input EOD (:func:`document_ids`; needs ``eod_id``).
        eod_id: the tokenizer's end-of-document id, for ``scope="document"``.

    Returns a scalar in the compute dtype (fp32, or float64 for float64
    input), or ``[b, s]`` for ``reduction="none"``.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    terms = simreg_terms(
        hidden, labels, loss_mask, temperature=temperature, chunk_size=chunk_size,
        ignore_index=ignore_index, impl=impl, vocab_size=vocab_size, debug=debug, scope=scope, eod_id=eod_id,
    )
    if reduction == "none":
        return terms.per_token
    if reduction == "sum":
        return terms.loss_sum
    return terms.loss_sum / terms.num_anchors.clamp_min(1)
