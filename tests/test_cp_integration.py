"""Context parallelism at integration level, on 2 CP gloo ranks against one process.

The full model cannot run CP on CPU (its attention needs TransformerEngine), so everything around the attention
runs for real:

* the trainer's data path: ``Batches.full`` / ``count_step_anchors`` / ``begin_step`` on the full sequences, and
  ``Batches.local``'s zigzag slices;
* the patch's ``_attach`` with the real SimReg and JREG, on fp64 layer states that each CP rank holds at its
  slice's ``position_ids`` (what the model would compute there);
* Megatron-LM's ``loss_func`` and ``forward_step`` rules, then ``finalize_model_grads``' rule for the CP ranks'
  gradients: averaged over DP x CP (DDP's ``1 / dp_cp``), or, with ``calculate_per_token_loss``, summed and divided
  by the tokens all ranks counted;
* the logging reduction (``report_losses``) over the CP group.

Each SimReg normalization x ``calculate_per_token_loss`` branch must give the single-process gradient of every
state and the same logged values.

Masks. With ``calculate_per_token_loss`` the masks are uneven on purpose. Without it Megatron's LM loss (and JREG,
which follows the LM loss's convention) is a mean of each CP rank's own token mean, which equals the sequence's mean
only when the CP ranks count the same tokens: that branch uses masks that are even over the CP ranks, so that one
process is still the reference (SimReg's normalizations are exact either way).
"""

from collections import deque
from types import SimpleNamespace

import megatron.core  # noqa: F401  (a hard import: a broken megatron-core fails these tests, never skips)
import numpy as np
import pytest
import torch

import megatron_simreg as ms
from megatron_utils import run_distributed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo tests; CPU adaptations refuse CUDA")

S, B, M, H, L, V = 16, 2, 2, 8, 2, 5  # sequence, micro-batch, micro-batches, hidden, layers, label vocabulary
BRANCHES = [(n, per_token) for n in ("global_batch", "micro_batch") for per_token in (False, True)]
# fp64 states: each value is a chain of a few reordered sums of at most S * B = 32 terms (SimReg's row sums over the
# sequence, JREG's token sum, the CP all-reduce), each within 32 * 2**-53 = 3.6e-15 relative of the exact value, so
# 1e-12 leaves a margin of more than 100x. The logged values pass through the tracker's fp32 shares: 2**-24 = 6e-8
# relative per rounding, a handful of them: 1e-6.
GRAD_RTOL, LOG_RTOL = 1e-12, 1e-6


def samples(per_token: bool):
    """The global batch's ``M * B`` samples (GPTDataset's keys, ``[S]`` numpy arrays), fixed by a seed."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(M * B):
        tokens = torch.randint(0, V, (S + 1,), generator=g)
        mask = (torch.rand(S, generator=g) > 0.3).float()
        if not per_token:  # even over 2 CP ranks: rank 0 holds chunks 0 and 3 of 4, rank 1 chunks 1 and 2
            c = S // 4
            mask[c:2 * c], mask[2 * c:3 * c] = mask[:c], mask[3 * c:]
        out.append({"tokens": tokens[:-1].numpy(), "labels": tokens[1:].numpy(), "loss_mask": mask.numpy(),
                    "position_ids": np.arange(S)})
    return out


def global_states():
    """Per micro-batch: the first layer's input, each layer's output and the final norm's output, ``[S, B, H]``
    fp64 leaves (the single-process model's activations)."""
    g = torch.Generator().manual_seed(11)
    return [[torch.randn(S, B, H, generator=g, dtype=torch.float64).requires_grad_() for _ in range(L + 2)]
            for _ in range(M)]


def _fake_model(per_token: bool):
    """What ``_attach`` reads of a GPTModel: its config, the last-stage flag, its layers and their queues."""
    layers = [SimpleNamespace(layer_number=n) for n in range(1, L + 1)]
    return SimpleNamespace(
        config=SimpleNamespace(calculate_per_token_loss=per_token, sequence_parallel=False, num_layers=L),
        post_process=True, decoder=SimpleNamespace(layers=layers),
        _megatron_simreg_pending={n: deque() for n in range(1, L + 1)})


def _step(normalization: str, per_token: bool):
    """One training step on this CP rank; returns (pieces, state grads, tokens counted, logged values)."""
    from megatron.core import parallel_state as ps

    from megatron_simreg.megatron import begin_step, count_step_anchors, end_step, patch, report_losses
    from megatron_simreg.megatron.step import STEP
    from megatron_simreg.training.data import Batches

    simreg = ms.SimRegConfig(weight=0.5, temperature=0.2, normalization=normalization, impl="naive")
    patch._ACTIVE.simreg, patch._ACTIVE.jreg = simreg, ms.JRegConfig(weight=2.0, weighting="layer_weighted")
    batches = Batches(samples(per_token), global_batch=M * B, micro_batch=B)
    full = batches.full(0)
    # the trainer's counts: from the full sequences, summed over DP (here 1) and not over CP
    begin_step(num_anchors=int(count_step_anchors([mb["labels"] for mb in full], [mb["loss_mask"] for mb in full],
                                                  simreg, cp=ps.get_context_parallel_world_size())),
               num_tokens=int(sum(mb["loss_mask"].sum() for mb in full)))
    STEP.num_microbatches, STEP.grad_scale_func = M, None  # what the wrapped schedules.forward_step records
    states = global_states()
    model = _fake_model(per_token)
    pieces, tokens_counted = [], 0
    for mb, st in zip(batches.local(full), states, strict=True):
        pos = mb["position_ids"][0]  # the positions this CP rank holds: the model's states there
        local = [x[pos] for x in st]
        cap = patch._Capture()
        cap.first, cap.recorded = (len(pos), B, torch.device("cpu")), list(range(1, L + 1))
        cap.with_grad = {n: (local[n - 1], local[n]) for n in range(1, L + 1)}
        cap.last_output, cap.final = local[L], local[L + 1]
        lm_per_token = (local[L + 1] ** 2).sum(-1).transpose(0, 1)  # [b, s_local]: a stand-in LM loss
        out = patch._attach(model, lm_per_token, cap, mb["labels"], mb["loss_mask"])
        # Megatron-LM's loss_func, then schedules.forward_step's rule
        mask = mb["loss_mask"].view(-1).double()
        loss, num_tokens = (out.reshape(-1) * mask).sum(), mask.sum()
        if not per_token:
            loss = loss / num_tokens.clamp_min(1) / M
        loss.backward()
        tokens_counted += float(num_tokens)
        pieces.append(mb)
    end_step()
    logged = report_losses(dp_group=ps.get_data_parallel_group())
    grads = [[x.grad for x in st] for st in states]
    return pieces, grads, tokens_counted, logged


def _all_branches(rank, world):
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(context_parallel_size=world)
    return {branch: _step(*branch) for branch in BRANCHES}


@pytest.fixture(scope="module")
def runs():
    single = run_distributed(_all_branches, 1, timeout=120)[0]
    cp2 = run_distributed(_all_branches, 2, timeout=120)
    return single, cp2


def test_the_cp_ranks_pieces_reassemble_each_sequence_in_zigzag_order(runs):
    single, cp2 = runs
    branch = BRANCHES[0]
    c = S // 4
    zigzag = [list(range(0, c)) + list(range(3 * c, 4 * c)), list(range(c, 3 * c))]  # Megatron's CP=2 layout
    for m, whole in enumerate(single[branch][0]):
        seen = torch.zeros(S, dtype=torch.long)
        for rank, result in enumerate(cp2):
            piece = result[branch][0][m]
            pos = piece["position_ids"][0]
            assert pos.tolist() == zigzag[rank], f"CP rank {rank} holds positions {pos.tolist()}"
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                assert torch.equal(piece[key], whole[key][:, pos]), key
            seen[pos] += 1
        assert seen.tolist() == [1] * S, "each position is held by exactly one CP rank"


@pytest.mark.parametrize("normalization,per_token", BRANCHES,
                         ids=[f"{n}-{'per_token' if p else 'mean'}" for n, p in BRANCHES])
def test_cp2_gradients_and_logs_equal_one_process(runs, normalization, per_token):
    single, cp2 = runs
    branch = (normalization, per_token)
    _, ref_grads, ref_tokens, ref_logged = single[branch]
    # finalize_model_grads' rule for the CP ranks' gradients (the states stand in for parameters both ranks share)
    if per_token:
        total_tokens = sum(r[branch][2] for r in cp2)
        assert total_tokens == ref_tokens
        scale, ref_scale = 1.0 / total_tokens, 1.0 / ref_tokens
    else:
        scale, ref_scale = 1.0 / len(cp2), 1.0
    for m in range(M):
        for i in range(L + 2):
            got = sum(r[branch][1][m][i] for r in cp2) * scale
            want = ref_grads[m][i] * ref_scale
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err <= GRAD_RTOL, f"micro-batch {m}, state {i}: relative error {err:.3g} > {GRAD_RTOL:g}"
    for r in cp2:
        logged = r[branch][3]
        assert logged.keys() == ref_logged.keys()
        for name, value in logged.items():
            assert value == pytest.approx(ref_logged[name], rel=LOG_RTOL), name
