"""Loss-level SimReg under TP/SP/CP layouts (gloo, CPU) against the single-process loss.

The full model cannot run context parallelism on CPU (its attention needs
TransformerEngine), so CP is proven here at the loss level: every rank holds
its zigzag/SP share of the same global hidden states, and the assembled
gradients must equal the single-process ones.
"""

import pytest
import torch
import torch.distributed as dist

import megatron_simreg as ms
from megatron_simreg.parallel.simreg_parallel import ShardLayout, parallel_simreg_terms, zigzag_positions

from megatron_utils import run_distributed

S, B, H, V = 24, 2, 8, 5
EOD = V  # an id outside the random labels, placed by hand for document scope
# Document scope: row 0 is documents 0-4, 5-15, 16-23 and row 1 is 0-9, 10-23 (a document ends one position after
# its EOD label). Shards are 6 or 12 positions long, so documents cross CP and SP shard boundaries.
EOD_LABELS = [(0, 3), (0, 14), (1, 8)]


def global_inputs(documents=False):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, S, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, S), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.2).float()
    if documents:
        for row, i in EOD_LABELS:
            labels[row, i] = EOD
    return hidden, labels, mask


def _config(mode="exact", chunk_size=None, impl="naive", scope="sequence"):
    return ms.SimRegConfig(mode=mode, chunk_size=chunk_size, impl=impl, scope=scope,
                           eod_id=EOD if scope == "document" else None)


def _worker(rank, world, tp, cp, sp, mode, chunk_size, impl, scope):
    # rank = cp_rank * tp + tp_rank, as Megatron orders TP fastest
    tp_groups = [dist.new_group([c * tp + t for t in range(tp)]) for c in range(cp)]
    cp_groups = [dist.new_group([c * tp + t for c in range(cp)]) for t in range(tp)]
    tp_rank, cp_rank = rank % tp, rank // tp
    layout = ShardLayout(tp_groups[cp_rank] if tp > 1 else None, cp_groups[tp_rank] if cp > 1 else None, sp)
    hidden, labels, mask = global_inputs(documents=scope == "document")
    cp_pos = zigzag_positions(S, cp, cp_rank)
    local = layout.local_slice(S // cp)
    pos = cp_pos[local]
    h_local = hidden[:, pos].transpose(0, 1).contiguous().requires_grad_()  # [s_local, b, h]
    cfg = _config(mode, chunk_size, impl, scope)
    terms = parallel_simreg_terms(h_local, labels[:, cp_pos], mask[:, cp_pos], cfg, layout)
    totals = torch.stack([terms.loss_sum.detach(), terms.num_anchors.double()])
    for g in layout.reduce_groups():
        dist.all_reduce(totals, group=g)
    (terms.loss_sum / totals[1]).backward()
    return pos, h_local.grad.transpose(0, 1), totals


def run_layout(tp, cp, sp, mode="exact", chunk_size=None, impl="naive", scope="sequence"):
    results = run_distributed(_worker, tp * cp, args=(tp, cp, sp, mode, chunk_size, impl, scope), timeout=120)
    grad = torch.zeros(B, S, H, dtype=torch.float64)
    seen = torch.zeros(S)
    for pos, g, totals in results:
        if sp or tp == 1:
            grad[:, pos] += g
            seen[pos] += 1
        else:  # without SP every TP rank must hold the same, full gradient of its CP share
            grad[:, pos] = g
            seen[pos] = 1
    assert torch.equal(seen, torch.ones(S)), "each position is held by exactly one rank"
    totals = results[0][2]
    assert all(torch.equal(r[2], totals) for r in results)
    return totals[0] / totals[1], totals[1], grad, results


def single_process(chunk_size=None, segments=None, scope="sequence"):
    """Reference: the whole sequence, or (shard_local) each segment of positions on its own."""
    hidden, labels, mask = global_inputs(documents=scope == "document")
    hidden.requires_grad_()
    if segments is None:
        terms = ms.simreg_terms(hidden, labels, mask, chunk_size=chunk_size, impl="naive", scope=scope,
                                eod_id=EOD if scope == "document" else None)
        loss_sum, count = terms.loss_sum, terms.num_anchors
    else:
        loss_sum, count = 0.0, 0
        for seg in segments:
            t = ms.simreg_terms(hidden[:, seg], labels[:, seg], mask[:, seg], impl="naive")
            loss_sum, count = loss_sum + t.loss_sum, count + t.num_anchors
    loss = loss_sum / count
    loss.backward()
    return loss.detach(), count, hidden.grad


@pytest.mark.parametrize(
    "tp,cp,sp,chunk_size,impl",
    [
        (2, 1, True, None, "naive"),
        (2, 1, False, None, "naive"),
        (1, 2, False, None, "naive"),
        (1, 2, False, 4, "blockwise"),
        (2, 2, True, None, "blockwise"),
        (2, 2, True, 6, "naive"),
    ],
)
def test_exact_mode_matches_single_process(tp, cp, sp, chunk_size, impl):
    loss, count, grad, _ = run_layout(tp, cp, sp, chunk_size=chunk_size, impl=impl)
    ref_loss, ref_count, ref_grad = single_process(chunk_size)
    assert count.item() == ref_count.item()
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert (grad - ref_grad).norm() <= 1e-10 * ref_grad.norm()


@pytest.mark.parametrize("tp,cp,sp,chunk_size,impl", [
    (2, 1, True, None, "blockwise"),
    (1, 2, False, None, "naive"),
    (2, 2, True, 5, "blockwise"),
])
def test_document_scope_matches_single_process(tp, cp, sp, chunk_size, impl):
    """Documents that cross SP and CP shard boundaries; the single-process document scope is itself checked against
    the hand-computed definition in test_simreg_documents.py."""
    loss, count, grad, results = run_layout(tp, cp, sp, chunk_size=chunk_size, impl=impl, scope="document")
    from test_simreg_documents import hand_documents

    _, labels, _ = global_inputs(documents=True)
    docs = hand_documents(labels, EOD)
    shard_of = {p: r for r, (pos, _, _) in enumerate(results) for p in pos.tolist()}
    assert any(shard_of[i] != shard_of[i + 1] and row[i] == row[i + 1] for row in docs for i in range(S - 1)), \
        "a document must span a shard boundary"
    ref_loss, ref_count, ref_grad = single_process(chunk_size, scope="document")
    assert count.item() == ref_count.item()
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert (grad - ref_grad).norm() <= 1e-10 * ref_grad.norm()
    seq_loss, seq_count, seq_grad = single_process(chunk_size)  # the check can see a cross-document pair
    assert seq_count.item() != ref_count.item() and (seq_grad - ref_grad).norm() > 1e-3 * ref_grad.norm()


def test_shard_local_is_simreg_chunk_over_shards():
    # TP=2 x CP=2 with SP: CP rank r holds zigzag chunks r and 3-r of 4 (6 positions each), and SP gives each TP
    # rank one of them, so every shard is exactly one zigzag chunk of 6 positions.
    loss, count, grad, results = run_layout(2, 2, True, mode="shard_local")
    segments = [pos for pos, _, _ in results]
    assert sorted(p.tolist() for p in segments) == [list(range(i, i + 6)) for i in range(0, 24, 6)]
    ref_loss, ref_count, ref_grad = single_process(segments=segments)
    assert count.item() == ref_count.item()
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert (grad - ref_grad).norm() <= 1e-10 * ref_grad.norm()
    # and it is a different objective from the exact one
    exact_loss, *_ = single_process()
    assert abs(exact_loss - ref_loss) > 1e-3


def test_shard_local_cp_splits_the_two_zigzag_chunks():
    loss, count, grad, results = run_layout(1, 2, False, mode="shard_local")
    segments = [pos[:6] for pos, _, _ in results] + [pos[6:] for pos, _, _ in results]
    ref_loss, ref_count, ref_grad = single_process(segments=segments)
    assert count.item() == ref_count.item()
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert (grad - ref_grad).norm() <= 1e-10 * ref_grad.norm()


def test_zigzag_positions():
    assert zigzag_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="divisible by 2 \\* context_parallel_size"):
        zigzag_positions(10, 3, 0)


@pytest.mark.parametrize("mode,tp,cp,sp,chunk_size", [
    ("exact", 2, 2, True, 4),
    ("shard_local", 2, 2, True, None),
    ("shard_local", 1, 2, False, 4),
])
def test_count_step_anchors_from_labels_matches_the_loss(mode, tp, cp, sp, chunk_size):
    from megatron_simreg.parallel.simreg_parallel import count_step_anchors

    hidden, labels, mask = global_inputs()
    cfg = ms.SimRegConfig(mode=mode, chunk_size=chunk_size)
    counted = count_step_anchors([labels[:1], labels[1:]], [mask[:1], mask[1:]], cfg, tp=tp, cp=cp, sequence_parallel=sp)
    _, count, _, _ = run_layout(tp, cp, sp, mode=mode, chunk_size=chunk_size)
    assert counted == count.item()
    if mode == "exact":
        assert counted == ms.simreg_terms(hidden, labels, mask, chunk_size=chunk_size).num_anchors.item()
