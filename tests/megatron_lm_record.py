"""Test-only instrumentation of Megatron-LM's loop: ``python tests/megatron_lm_record.py SCRIPT.py [args...]`` (one
process per rank, under torchrun) applies ``tests/megatron_lm_cpu.py``'s CPU shims, installs what is below, and runs
SCRIPT as ``__main__``.

``SIMREG_MLM_RECORD=path.jsonl``: the last rank (the one ``training_log`` prints on) writes one JSON line per
iteration: the loss dict's values, the pre-clip ``grad_norm`` and the learning rate, as ``training_log`` gets them.

``SIMREG_MLM_HAND_CHECK=1`` (one process only) adds, to each line, the step's objective written out by hand and its
gradient's difference from the one the optimizer receives. Before each ``train_step``, on the same weights and the
step's micro-batches (read ahead, not consumed), it runs the *unpatched* ``GPTModel.forward`` and back-propagates

* without ``--calculate-per-token-loss``: ``sum_k (LM_k + alpha J_k) / (n_k M) + lambda sum_k S_k / A``
  (``M`` micro-batches, ``n_k`` valid tokens of micro-batch ``k``),
* with it: ``(sum_k LM_k + alpha J_k) / N + lambda sum_k S_k / A`` (``N`` valid tokens of the step),

where ``LM_k`` sums the per-token LM loss over valid tokens, ``S_k`` sums SimReg's ``l_i`` (the naive
``[b, s, s]`` implementation, ``losses.simreg.simreg_terms(impl="naive")``) over the anchors of micro-batch ``k``,
``A`` counts the step's anchors (with ``--simreg-scope document``, ``S_k`` and ``A`` are sums over each document
of the sequence alone, its positions found by walking the labels by hand: ``test_simreg_documents.py``), and
``J_k`` sums over valid tokens and layers ``w_l`` times the angular distance between layer ``l``'s input and
output, arccos(cos)/pi, written out here with the weights ``w_l`` of ``--jreg-weighting`` (``final``: the last
layer; ``layer_weighted``: ``(l/L)^p`` normalized to sum 1). MoE's aux loss and MTP's loss come from the unpatched
model, with the backward scale Megatron's schedule gives them. The gradient lands in the DDP
grad buffers (Megatron's own accumulation), is copied, and the step then zeroes and recomputes them.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from test_simreg_documents import per_document_slices  # imported while this file's directory is on sys.path

RECORD_ENV, CHECK_ENV = "SIMREG_MLM_RECORD", "SIMREG_MLM_HAND_CHECK"
_CHECKED = {}  # iteration -> the hand check's numbers


def install() -> None:
    import megatron.training.training as training

    if not os.environ.get(RECORD_ENV) or getattr(training, "_simreg_test_recorder", False):
        return
    original_log, original_train = training.training_log, training.train

    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale, report_memory_flag,
                     skipped_iter, grad_norm, *args, **kwargs):
        import torch.distributed as dist

        if dist.get_rank() == dist.get_world_size() - 1:
            line = {"iteration": iteration, "lr": learning_rate, "grad_norm": grad_norm,
                    **{k: float(v) for k, v in loss_dict.items()}, **_CHECKED.pop(iteration, {})}
            with open(os.environ[RECORD_ENV], "a") as f:
                f.write(json.dumps(line) + "\n")
        return original_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale, report_memory_flag,
                            skipped_iter, grad_norm, *args, **kwargs)

    def train(*args, **kwargs):  # wraps train_step here: after the adapter wrapped it, so this check runs first
        if os.environ.get(CHECK_ENV) == "1":
            training.train_step = _checked(training.train_step)
        return original_train(*args, **kwargs)

    training.training_log, training.train = training_log, train
    training._simreg_test_recorder = True


def _checked(train_step):
    from megatron.training import get_args

    def step(forward_step_func, data_iterator, model, optimizer, *args, **kwargs):
        import torch.distributed as dist
        from megatron.core.num_microbatches_calculator import get_num_microbatches

        from megatron_simreg.megatron_lm import _peek

        assert dist.get_world_size() == 1, "the hand check needs the whole model in one process"
        margs = get_args()
        batches = _peek(data_iterator, get_num_microbatches())
        reference = _hand_step(model, batches, margs)
        grads = {}
        original_step = optimizer.step

        def step_and_copy():  # the gradient the optimizer receives, before clipping
            grads["megatron"] = _main_grads(model)
            return original_step()

        optimizer.step = step_and_copy
        try:
            result = train_step(forward_step_func, data_iterator, model, optimizer, *args, **kwargs)
        finally:
            del optimizer.step
        got, want = grads["megatron"], reference.pop("grads")
        reference["hand_grad_rel_err"] = float((got - want).norm() / want.norm())
        reference["hand_grad_norm"] = float(want.norm())
        _CHECKED[margs.curr_iteration + 1] = reference
        return result

    return step


def _main_grads(model) -> torch.Tensor:
    return torch.cat([p.main_grad.detach().double().flatten() for chunk in model for p in chunk.parameters()
                      if getattr(p, "main_grad", None) is not None])


def _unwrapped(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _hand_step(model, batches, args) -> dict:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    from megatron_simreg.losses.simreg import simreg_terms

    (chunk,) = model
    gpt = _unwrapped(chunk)
    forward = type(gpt).forward
    forward = getattr(forward, "__wrapped__", forward)  # the unpatched GPTModel.forward
    m, per_token = len(batches), args.calculate_per_token_loss
    lam, alpha = args.simreg_weight, args.jreg_weight
    assert args.jreg_metric == "angular"
    assert args.simreg_normalization == "global_batch" and args.simreg_chunk_size is None
    documents = _documents(args)
    aux_scale = torch.ones(1) if per_token else torch.ones(1) / m  # as schedules.forward_step_calc_loss sets them
    MoEAuxLossAutoScaler.set_loss_scale(aux_scale)
    MTPLossAutoScaler.set_loss_scale(aux_scale)

    captured = {}
    hooks = [gpt.decoder.register_forward_hook(lambda mod, a, out: captured.__setitem__("final", out))]
    for n, layer in enumerate(gpt.decoder.layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda mod, a, k, n=n: captured.__setitem__(("in", n), k.get("hidden_states", a[0] if a else None)),
            with_kwargs=True))
        hooks.append(layer.register_forward_hook(
            lambda mod, a, out, n=n: captured.__setitem__(("out", n), out[0] if isinstance(out, tuple) else out)))
    num_layers = len(gpt.decoder.layers)
    if args.jreg_weighting == "final":
        weights = [0.0] * (num_layers - 1) + [1.0]
    else:  # layer_weighted: w_l = (l / L)^p, normalized to sum 1
        raw = [((n + 1) / num_layers) ** args.jreg_power for n in range(num_layers)]
        weights = [w / sum(raw) for w in raw]
    masks = [b["loss_mask"].float() for b in batches]
    n_step = sum(float(mk.sum()) for mk in masks)
    anchors = sum(_anchors(b["labels"], mask, documents(b["labels"])) for b, mask in zip(batches, masks))
    chunk.zero_grad_buffer()
    for p in chunk.parameters():  # the optimizer left .grad aliasing main_grad: DDP's hook would add it twice
        p.grad = None
    lm_sums, s_means, j_means = [], [], []
    recompute, gpt.config.recompute_granularity = gpt.config.recompute_granularity, None  # keep the states' graph
    try:
        for b, mask in zip(batches, masks):
            out = forward(gpt, b["tokens"], b["position_ids"], b.get("attention_mask"), labels=b["labels"],
                          loss_mask=b["loss_mask"])
            lm = (out.float() * mask).sum()
            n_k = mask.sum()
            final, s, a_k = captured["final"].transpose(0, 1), 0.0, 0.0  # [b, s, h]
            for row, slices in enumerate(documents(b["labels"])):
                for sl in slices:
                    terms = simreg_terms(final[row:row + 1, sl], b["labels"][row:row + 1, sl],
                                         b["loss_mask"][row:row + 1, sl], temperature=args.simreg_temperature,
                                         impl="naive")
                    s, a_k = s + terms.per_token.sum(), a_k + float(terms.anchors.sum())
            j = 0.0
            for n, w in enumerate(weights):
                cos = F.cosine_similarity(captured[("in", n)].float(), captured[("out", n)].float(), dim=-1)  # [s, b]
                j = j + w * (torch.arccos(cos.clamp(-1 + 1e-7, 1 - 1e-7)) / math.pi * mask.t()).sum()
            if per_token:
                objective = lm + alpha * j + lam * s * n_step / max(anchors, 1)
            else:
                objective = (lm + alpha * j) / (n_k * m) + lam * s / max(anchors, 1)
            objective.backward()
            lm_sums.append(float(lm.detach()))
            s_means.append(float(s.detach()) / max(a_k, 1))
            j_means.append(float(j.detach()) / float(n_k))
    finally:
        gpt.config.recompute_granularity = recompute
        for h in hooks:
            h.remove()
    grads = _main_grads(model) / (n_step if per_token else 1.0)  # finalize_model_grads divides by N
    return {"grads": grads, "hand_lm_loss": sum(lm_sums) / n_step,
            "hand_simreg_loss": sum(s_means) / m, "hand_jreg_loss": sum(j_means) / m}


def _documents(args):
    """``labels [b, s] -> per row, the slices SimReg pairs within``: the whole row, or each document."""
    if args.simreg_scope == "sequence":
        return lambda labels: [[slice(0, labels.shape[1])]] * labels.shape[0]
    from megatron.training import get_tokenizer

    eod = get_tokenizer().eod
    return lambda labels: per_document_slices(labels, eod)


def _anchors(labels: torch.Tensor, mask: torch.Tensor, slices) -> float:
    """Valid positions with another valid position of the same label in their sequence (or document slice)."""
    total = 0.0
    for row, row_slices in enumerate(slices):
        for sl in row_slices:
            y, valid = labels[row, sl], mask[row, sl] == 1
            eye = torch.eye(y.shape[0], dtype=torch.bool)
            pairs = (y[:, None] == y[None, :]) & valid[:, None] & valid[None, :] & ~eye
            total += float((pairs.any(-1) & valid).sum())
    return total


if __name__ == "__main__":
    import sys

    import megatron_lm_cpu  # this file's directory is first on sys.path

    megatron_lm_cpu.apply_megatron_lm_cpu_shims()
    install()
    megatron_lm_cpu.main(sys.argv[1:])
