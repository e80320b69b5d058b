"""Document-scope SimReg (``scope="document"``) in one process, against the definition computed by hand.

Documents are found by walking each row by hand (:func:`hand_documents`), not with ``document_ids``, and the
reference is ``loop_reference`` (the definition in Python floats, float64) restricted to each anchor's document.
Tolerances: float64 against float64, as in ``test_simreg.py``: the implementations sum O(s) terms of size O(1/tau)
in a different order, so they differ by O(s * 1e-16 / tau) ~ 1e-13; 1e-10 relative leaves three orders of margin
and is still 10^5 below the smallest effect of one cross-document pair in this data (checked by
``test_the_data_has_cross_document_pairs``).

The parallel layouts (TP/SP/CP, documents across shard boundaries) are in ``test_parallel_loss.py``; Triton in
``test_simreg_triton.py``.
"""

import pytest
import torch

import megatron_simreg as ms
from megatron_simreg.losses.simreg import document_ids
from megatron_simreg.parallel.simreg_parallel import count_step_anchors

from test_simreg import loop_reference, make

EOD = 4  # one of the 5 label classes of `make`: documents of ~5 positions


def hand_documents(labels, eod):
    """Per row, each position's document: a document ends at the position whose input (the label before) is EOD."""
    out = []
    for row in labels.tolist():
        doc, docs = 0, []
        for i in range(len(row)):
            docs.append(doc)
            if i >= 1 and row[i - 1] == eod:
                doc += 1
        out.append(docs)
    return out


def per_document_slices(labels, eod):
    """Per row, the ``slice`` of each document."""
    result = []
    for docs in hand_documents(labels, eod):
        bounds = [0] + [i for i in range(1, len(docs)) if docs[i] != docs[i - 1]] + [len(docs)]
        result.append([slice(a, z) for a, z in zip(bounds[:-1], bounds[1:])])
    return result


def test_document_ids_follow_megatrons_reset_convention():
    # inputs:  a  b  EOD c  d  EOD EOD e      (labels are the inputs shifted by one)
    labels = torch.tensor([[1, 9, 2, 3, 9, 9, 5, 6]])
    # position 2's input is EOD: it closes document 0 (as --reset-attention-mask lets it attend to a, b);
    # position 5's input closes document 1 and position 6 is document 2, a lone EOD.
    assert document_ids(labels, 9).tolist() == [[0, 0, 0, 1, 1, 1, 2, 3]]
    assert document_ids(labels, 9).tolist() == hand_documents(labels, 9)
    assert document_ids(labels, 7).tolist() == [[0] * 8]


@pytest.mark.parametrize("chunk_size", [None, 6])
@pytest.mark.parametrize("impl", ["naive", "blockwise"])
def test_matches_hand_computed_per_document(impl, chunk_size, monkeypatch):
    monkeypatch.setattr("megatron_simreg.losses.simreg_blockwise.DEFAULT_BLOCK_SIZE", 8)  # several blocks
    hidden, labels, mask = make(b=2, s=40, h=8, classes=5, seed=4)
    total, count, per_token = loop_reference(hidden, labels, mask, 0.1, chunk_size,
                                             documents=hand_documents(labels, EOD))
    assert count > 0
    terms = ms.simreg_terms(hidden, labels, mask, chunk_size=chunk_size, impl=impl, scope="document", eod_id=EOD)
    torch.testing.assert_close(terms.per_token, per_token, rtol=1e-10, atol=1e-12)
    assert terms.num_anchors.item() == count
    mean = ms.simreg_loss(hidden, labels, mask, chunk_size=chunk_size, impl=impl, scope="document", eod_id=EOD)
    assert abs(mean.item() - total / count) <= 1e-10 * abs(total / count)


@pytest.mark.parametrize("impl", ["naive", "blockwise"])
def test_gradient_equals_the_sum_over_documents(impl, monkeypatch):
    """Document scope = sequence scope on each document alone: values and float64 gradients."""
    monkeypatch.setattr("megatron_simreg.losses.simreg_blockwise.DEFAULT_BLOCK_SIZE", 8)
    hidden, labels, mask = make(b=2, s=40, h=8, classes=5, seed=5)
    weights = torch.randn(2, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    h = hidden.clone().requires_grad_()
    terms = ms.simreg_terms(h, labels, mask, impl=impl, scope="document", eod_id=EOD)
    (terms.per_token * weights).sum().backward()
    ref = hidden.clone().requires_grad_()
    ref_total, count = 0.0, 0
    for row, slices in enumerate(per_document_slices(labels, EOD)):
        for sl in slices:
            t = ms.simreg_terms(ref[row:row + 1, sl], labels[row:row + 1, sl], mask[row:row + 1, sl], impl="naive")
            ref_total = ref_total + (t.per_token * weights[row:row + 1, sl]).sum()
            count += int(t.num_anchors)
    ref_total.backward()
    assert terms.num_anchors.item() == count > 0
    assert abs((terms.per_token * weights).sum().item() - ref_total.item()) <= 1e-10 * abs(ref_total.item())
    assert (h.grad - ref.grad).norm() <= 1e-10 * ref.grad.norm()


def test_the_data_has_cross_document_pairs():
    """The harness can see a cross-document pair: with them (sequence scope) the gradient moves far beyond 1e-10."""
    hidden, labels, mask = make(b=2, s=40, h=8, classes=5, seed=5)
    grads = {}
    for scope in ("sequence", "document"):
        h = hidden.clone().requires_grad_()
        ms.simreg_loss(h, labels, mask, impl="naive", scope=scope, eod_id=EOD).backward()
        grads[scope] = h.grad
    assert (grads["sequence"] - grads["document"]).norm() > 1e-3 * grads["document"].norm()


@pytest.mark.parametrize("chunk_size", [None, 6])
@pytest.mark.parametrize("impl", ["naive", "blockwise"])
def test_one_document_is_sequence_scope(impl, chunk_size):
    """No EOD among the labels, or only as the last two (the EOD closing the sequence's one document): identical."""
    hidden, labels, mask = make(b=2, s=30, h=8, classes=4, seed=6)  # labels 0..3: no EOD (4)
    labels[1, -1] = EOD
    labels[0, -2] = EOD
    outs = {}
    for scope in ("sequence", "document"):
        h = hidden.clone().requires_grad_()
        terms = ms.simreg_terms(h, labels, mask, chunk_size=chunk_size, impl=impl, scope=scope, eod_id=EOD)
        terms.loss_sum.backward()
        outs[scope] = (terms.per_token.detach(), terms.anchors, h.grad)
    assert all(torch.equal(a, b) for a, b in zip(outs["sequence"], outs["document"]))


@pytest.mark.parametrize("mode,tp,cp,sp,chunk_size", [
    ("exact", 1, 1, False, None), ("exact", 2, 2, True, 5), ("shard_local", 2, 2, True, None),
    ("shard_local", 1, 2, False, 3),
])
def test_count_step_anchors_counts_per_document(mode, tp, cp, sp, chunk_size):
    """begin_step's anchor count from labels alone equals the loss's own count, per document."""
    from megatron_simreg.parallel.simreg_parallel import pairing_segments

    hidden, labels, mask = make(b=3, s=40, h=4, classes=5, seed=7)
    config = ms.SimRegConfig(mode=mode, chunk_size=chunk_size, scope="document", eod_id=EOD)
    segments = pairing_segments(40, config, tp, cp, sp)
    docs = hand_documents(labels, EOD)
    expected = 0
    for row in range(3):
        valid = [(mask[row, i] == 1).item() and labels[row, i].item() != -100 for i in range(40)]
        for i in range(40):
            expected += valid[i] and any(
                valid[j] and j != i and labels[row, j] == labels[row, i] and docs[row][j] == docs[row][i]
                and segments[j] == segments[i] for j in range(40))
    got = count_step_anchors(labels, mask, config, tp=tp, cp=cp, sequence_parallel=sp)
    assert int(got) == expected > 0
    sequence = count_step_anchors(labels, mask, ms.SimRegConfig(mode=mode, chunk_size=chunk_size), tp=tp, cp=cp,
                                  sequence_parallel=sp)
    assert int(sequence) > expected  # the data has same-label pairs across documents


@pytest.mark.parametrize("kwargs,match", [
    (dict(scope="document"), "needs eod_id"),
    (dict(scope="document", eod_id=-1), "needs eod_id"),
    (dict(scope="documents", eod_id=1), "scope must be one of"),
])
def test_bad_scope_arguments(kwargs, match):
    hidden, labels, mask = make()
    with pytest.raises(ValueError, match=match):
        ms.simreg_loss(hidden, labels, mask, **kwargs)
    with pytest.raises(ValueError, match=match):
        ms.SimRegConfig(**kwargs)

