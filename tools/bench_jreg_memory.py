"""What one training forward of a GPTModel holds for its backward, with and without JREG, per recompute mode.

Counts the distinct storages of the tensors that autograd still holds when the forward returns (through
``torch.autograd.graph.saved_tensors_hooks``: each saved tensor is boxed, and a box lives exactly as long as
the graph that saved it). CPU, one gloo process, Megatron-core's local spec; no GPU needed. The extra column
is JREG's share in units of ``s*b*h`` bytes (per token and hidden unit of the chunk's micro-batch).

Also prints a SHA-256 of all gradients after the backward, so that two versions of the patch can be checked for
bit-identical gradients by running this script under each.

    .venv/bin/python tools/bench_jreg_memory.py                # bf16, 8 layers, h=256, s=512, b=2
    .venv/bin/python tools/bench_jreg_memory.py --dtype fp32 --layers 4
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import warnings
import weakref

import torch


class _Box:
    """What autograd keeps for a saved tensor; alive exactly as long as the graph that saved it."""

    __slots__ = ("tensor", "__weakref__")


def retained_saved_bytes(run):
    """``(run(), bytes)``: the distinct storages of the tensors that ``run``'s autograd graphs still hold for backward
    when it returns (counted through ``saved_tensors_hooks``; also used by ``tests/test_patch_gpu_path.py``)."""
    live = weakref.WeakSet()

    def pack(t):
        box = _Box()
        box.tensor = t
        live.add(box)
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
        out = run()
    gc.collect()
    storages = {}
    for box in list(live):
        storage = box.tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return out, sum(storages.values())


def _init():
    from megatron_simreg.parallel.process import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state

    from megatron_simreg.megatron.cpu_compat import apply_cpu_adaptations

    apply_cpu_adaptations()
    parallel_state.initialize_model_parallel()


def _model(args, dtype, recompute):
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_simreg.megatron.cpu_compat import get_cpu_gpt_layer_spec
    from megatron_simreg.megatron.init import init_params_by_global_name

    model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.hidden // 32, ffn_hidden_size=4 * args.hidden,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True, gradient_accumulation_fusion=False, bias_dropout_fusion=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        **recompute,
    )
    model = GPTModel(config=config, transformer_layer_spec=get_cpu_gpt_layer_spec(normalization="RMSNorm"),
                     vocab_size=args.vocab, max_sequence_length=args.seq, position_embedding_type="rope")
    init_params_by_global_name(model, seed=1234, std=0.05, perturb_norms=True)
    return model.train()


def measure(args, dtype, recompute, jreg):
    import megatron_simreg as ms
    from megatron_simreg.megatron import apply_to_megatron, tracker, undo_megatron_patch

    model = _model(args, dtype, recompute)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    mask = torch.ones(args.batch, args.seq)
    mask[:, -args.seq // 8:] = 0
    pos = torch.arange(args.seq).expand_as(ids)
    apply_to_megatron(jreg=ms.JRegConfig(weight=1.0, weighting=jreg) if jreg else None)
    try:
        def forward():
            per_token = model(ids, pos, None, labels=labels, loss_mask=mask)
            return (per_token.float() * mask).sum() / mask.sum()

        loss, held = retained_saved_bytes(forward)
        loss.backward()
        queued = sum(len(q) for q in getattr(model, "_megatron_simreg_pending", {}).values())
    finally:
        undo_megatron_patch()
        tracker.clear()
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(p.grad.float().numpy().tobytes())
    return held, queued, digest.hexdigest()[:16]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--block-layers", type=int, default=None, help="layers checkpointed by block recompute (L/2)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    k = args.block_layers or args.layers // 2
    modes = {
        "no recompute": {},
        f"full block {k}/{args.layers}": dict(recompute_granularity="full", recompute_method="block",
                                              recompute_num_layers=k),
        "full uniform 1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    }
    _init()
    sbh = args.seq * args.batch * args.hidden
    print(f"{args.dtype}, L={args.layers}, h={args.hidden}, s={args.seq}, b={args.batch}: "
          f"held for backward after one training forward (s*b*h = {sbh} elements)")
    print(f"{'recompute':<18} {'JREG':<15} {'held MiB':>9} {'JREG extra':>11} {'/ (s*b*h) B':>12} "
          f"{'queued after bw':>15}  grad sha256")
    for mode, recompute in modes.items():
        base = None
        for jreg in (None, "final", "layer_weighted"):
            held, queued, digest = measure(args, dtype, recompute, jreg)
            base = held if base is None else base
            extra = held - base
            print(f"{mode:<18} {jreg or 'off':<15} {held / 2**20:9.2f} {extra / 2**20:9.2f}Mi {extra / sbh:12.2f} "
                  f"{queued:>15}  {digest}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
