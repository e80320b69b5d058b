"""``megatron-simreg train``: a plain pretraining loop over Megatron-core's GPTModel.

One iteration = one global batch of ``--global-batch-size`` samples. Sample
``i`` of the run is sample ``i`` of megatron-core's ``GPTDataset`` (seeded
by ``--seed``), so the data order depends only on the iteration, and resuming
from a checkpoint replays exactly the samples an uninterrupted run would
have seen. Each data-parallel rank takes its contiguous slice of the global
batch and splits it into micro-batches.
"""

from __future__ import annotations

import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from ..config import JRegConfig, SimRegConfig
from ..megatron.init import init_params_by_global_name
from ..parallel.comm import comm_device
from ..parallel.process import init_distributed
from . import checkpoint as ckpt
from .metrics import MetricsWriter


class TrainingStopped(RuntimeError):
    """A run stopped on purpose (NaN loss), after keeping its last good checkpoint."""


def model_settings(args, vocab_size: int) -> dict:
    """The model (and layout) a checkpoint records; a resume must match the model (see checkpoint.check_compatible)."""
    keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "seq_length",
            "normalization", "swiglu", "untie_embeddings_and_output_weights", "position_embedding_type",
            "num_experts", "moe_router_topk", "tensor_model_parallel_size", "pipeline_model_parallel_size",
            "context_parallel_size", "deepspeed")
    out = {k: getattr(args, k) for k in keys}
    out["ffn_hidden_size"] = ffn_hidden_size(args)
    out["num_query_groups"] = args.num_query_groups or args.num_attention_heads
    out["padded_vocab_size"] = vocab_size
    out["data_parallel_size"] = dist.get_world_size() // (
        args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size)
    return out


def padded_vocab(vocab: int, args) -> int:
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return int(math.ceil(vocab / multiple) * multiple)


def ffn_hidden_size(args) -> int:
    """``--ffn-hidden-size``, else 4h, or 8h/3 rounded up to a multiple of 64 with SwiGLU (Llama's rule)."""
    return args.ffn_hidden_size or (int(8 * args.hidden_size / 3 + 63) // 64 * 64 if args.swiglu else 4 * args.hidden_size)


def build_model(args, vocab_size: int):
    import torch.nn.functional as F

    from ..megatron.model import GPTShape, build_gpt, transformer_config

    ffn = ffn_hidden_size(args)
    shape = GPTShape(num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=ffn,
                     num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
                     vocab_size=vocab_size, seq_length=args.seq_length, num_experts=args.num_experts,
                     moe_router_topk=args.moe_router_topk,
                     untie_embeddings=args.untie_embeddings_and_output_weights)
    moe = {}
    if args.num_experts:
        moe = dict(moe_aux_loss_coeff=args.moe_aux_loss_coeff,
                   moe_router_load_balancing_type="aux_loss" if args.moe_aux_loss_coeff > 0 else "none")
    config = transformer_config(
        shape, tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
        cp=args.context_parallel_size, sp=args.sequence_parallel,
        dtype=torch.bfloat16 if args.bf16 else torch.float32, normalization=args.normalization,
        gated_linear_unit=args.swiglu, activation_func=F.silu if args.swiglu else F.gelu,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers, **moe,
    )
    return build_gpt(shape, config, position_embedding_type=args.position_embedding_type), config


class Batches:
    """Micro-batches of iteration ``it`` for this rank, from a map-style GPT dataset."""

    def __init__(self, dataset, global_batch: int, micro_batch: int):
        from megatron.core import parallel_state as ps

        self.dataset, self.global_batch, self.micro_batch = dataset, global_batch, micro_batch
        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.per_rank = global_batch // dp
        self.offset = rank * self.per_rank
        self.cp, self.cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()

    def full(self, it: int):
        """This rank's samples of iteration ``it`` as full-sequence micro-batches."""
        start = it * self.global_batch + self.offset
        samples = [self.dataset[start + i] for i in range(self.per_rank)]
        out = []
        for m in range(0, self.per_rank, self.micro_batch):
            group = samples[m:m + self.micro_batch]
            out.append({k: torch.stack([torch.as_tensor(np.asarray(s[k])) for s in group])
                        for k in ("tokens", "labels", "loss_mask", "position_ids")})
        return out

    def local(self, microbatches):
        """Slice each micro-batch to this CP rank's zigzag positions and move it to the device."""
        from ..parallel.simreg_parallel import zigzag_positions

        device = "cuda" if torch.cuda.is_available() else "cpu"
        out = []
        for mb in microbatches:
            if self.cp > 1:
                pos = zigzag_positions(mb["tokens"].shape[1], self.cp, self.cp_rank)
                mb = {k: v[:, pos] for k, v in mb.items()}
            out.append({k: v.to(device) for k, v in mb.items()})
        return out


def _all_sum(values, group=None):
    t = torch.tensor(values, dtype=torch.float64, device=comm_device(group))
    if dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t.tolist()


def run(args) -> dict:
    """Train; returns the last logged record. Every rank calls it."""
    init_distributed()
    install_signal_handlers()
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        if args.context_parallel_size > 1:
            raise ValueError("--context-parallel-size > 1 needs TransformerEngine attention on CUDA; on CPU, context "
                             "parallelism is covered by the loss-level tests only")
        from ..megatron.cpu_compat import apply_cpu_adaptations

        apply_cpu_adaptations()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from ..megatron import apply_to_megatron, begin_step, count_step_anchors, report_losses, undo_megatron_patch

    world = dist.get_world_size()
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size
    if world % model_parallel:
        raise ValueError(f"world size {world} is not divisible by TP x PP x CP = {model_parallel}")
    ps.initialize_model_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                 pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                                 context_parallel_size=args.context_parallel_size)
    dp = ps.get_data_parallel_world_size()
    gbs = args.global_batch_size or args.micro_batch_size * dp
    if gbs % (args.micro_batch_size * dp):
        raise ValueError(f"--global-batch-size {gbs} must be a multiple of --micro-batch-size x data-parallel size "
                         f"({args.micro_batch_size} x {dp})")
    num_micro = gbs // (args.micro_batch_size * dp)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)

    train_ds, valid_ds, tokenizer = _datasets(args, gbs)
    vocab = padded_vocab(tokenizer.vocab_size, args)
    model, config = build_model(args, vocab)
    init_params_by_global_name(model, seed=args.seed, std=config.init_method_std, num_layers=args.num_layers)
    simreg = (SimRegConfig(weight=args.simreg_weight, temperature=args.simreg_temperature,
                           chunk_size=args.simreg_chunk_size, mode=args.simreg_mode,
                           representation=args.simreg_representation) if args.simreg_weight > 0 else None)
    jreg = JRegConfig(weight=args.jreg_weight, weighting=args.jreg_weighting) if args.jreg_weight > 0 else None
    if simreg or jreg:
        apply_to_megatron(simreg=simreg, jreg=jreg)
    else:
        undo_megatron_patch()

    if args.deepspeed:
        from .backends import DeepSpeedBackend

        backend = DeepSpeedBackend(args, model, config, num_micro)
    else:
        from .backends import MegatronBackend

        backend = MegatronBackend(args, model, config)

    settings = model_settings(args, vocab)
    start_iter = ckpt.resume(args.load, backend, settings, load_optim=not args.no_load_optim,
                             fresh_start=args.fresh_start, tokenizer_vocab=tokenizer.vocab_size)
    meta = ckpt.run_meta(args, settings, tokenizer.model_path)
    rank0 = dist.get_rank() == 0
    writer = MetricsWriter(args.save, args.tensorboard_dir, args.train_iters, start_iter, enabled=rank0)
    batches = Batches(train_ds, gbs, args.micro_batch_size)
    valid_batches = Batches(valid_ds, gbs, args.micro_batch_size) if valid_ds is not None else None
    dp_group = ps.get_data_parallel_group()
    n_params = sum(_all_sum([sum(p.numel() for p in model.parameters())], ps.get_model_parallel_group()))
    tokens_per_iter = gbs * args.seq_length
    last = {}
    try:
        for it in range(start_iter, args.train_iters):
            full = batches.full(it)
            if simreg is not None:
                anchors, ntok = _all_sum([
                    int(count_step_anchors([mb["labels"] for mb in full], [mb["loss_mask"] for mb in full], simreg,
                                           tp=args.tensor_model_parallel_size, cp=args.context_parallel_size,
                                           sequence_parallel=args.sequence_parallel)),
                    sum(float(mb["loss_mask"].sum()) for mb in full)], dp_group)
                begin_step(num_anchors=int(anchors), num_tokens=int(ntok))
            lr = backend.lr  # the rate this iteration uses; the step advances the schedule
            t0 = time.perf_counter()
            sums, grad_norm = backend.train_step(batches.local(full))
            elapsed = time.perf_counter() - t0
            lm = float(sums[0] / sums[1].clamp_min(1))
            reg = report_losses(pp_group=ps.get_pipeline_model_parallel_group(), dp_group=dp_group)
            if not math.isfinite(lm):
                raise TrainingStopped(
                    f"iteration {it + 1}: the LM loss is {lm}; stopping. The last good checkpoint "
                    f"({args.save or 'none: --save was not set'}) is kept; lower --lr or raise --clip-grad, then "
                    "resume with --load")
            record = {"iteration": it + 1, "consumed_tokens": (it + 1) * tokens_per_iter, "lm_loss": lm,
                      "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tokens_per_iter / elapsed,
                      "tflops": _tflops(n_params, args, tokens_per_iter, elapsed) / world,
                      "mem_gb": _mem_gb()}
            if simreg is not None:
                record["simreg_loss"] = reg["simreg"]
            if jreg is not None:
                record["jreg_loss"] = reg["jreg"]
            if args.num_experts:
                record["moe_aux_loss"] = _moe_aux_loss(num_micro)
            if valid_batches is not None and args.eval_interval and ((it + 1) % args.eval_interval == 0
                                                                    or it + 1 == args.train_iters):
                record["val_loss"] = evaluate(backend, valid_batches, args.eval_iters)
            if (it + 1) % args.log_interval == 0 or "val_loss" in record or it + 1 == args.train_iters:
                writer.log(record)
            last = record
            exiting = (args.exit_interval and (it + 1) % args.exit_interval == 0) or _signal_received()
            if args.save and ((args.save_interval and (it + 1) % args.save_interval == 0) or exiting):
                ckpt.save(args.save, it + 1, meta, backend)
            if exiting:
                return last
        saved_by_interval = args.save_interval and args.train_iters % args.save_interval == 0
        if args.save and last and not saved_by_interval:
            ckpt.save(args.save, args.train_iters, meta, backend)
    finally:
        writer.close()
    return last


_SIGNALLED = {"flag": False}


def install_signal_handlers() -> None:
    """SIGUSR1 (SLURM's warning before preemption) and SIGTERM: checkpoint at the next step boundary, then exit."""
    import signal

    def handler(signum, frame):
        _SIGNALLED["flag"] = True

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, handler)


def _signal_received() -> bool:
    """Whether any rank got a stop signal: ranks must agree on the iteration they stop at."""
    flag = torch.tensor([1.0 if _SIGNALLED["flag"] else 0.0], device=comm_device())
    if dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def evaluate(backend, valid_batches: Batches, eval_iters: int) -> float:
    sums = torch.zeros(2)
    for i in range(eval_iters):
        sums += backend.eval_step(valid_batches.local(valid_batches.full(i)))
    return float(sums[0] / sums[1].clamp_min(1))


def _datasets(args, gbs):
    from ..data.datasets import build_gpt_datasets
    from ..data.default_corpus import prepare_default_corpus
    from ..data.tokenizer import Tokenizer

    cache = args.data_cache_path or os.path.join(os.path.expanduser("~"), ".cache", "megatron_simreg")
    if args.data_path:
        data_path, tok_model = args.data_path, args.tokenizer_model
    else:
        prefix, tok_model = _on_rank0_first(lambda: prepare_default_corpus(cache))
        data_path = [prefix]
    tokenizer = Tokenizer(tok_model)
    evals = (args.train_iters // args.eval_interval + 1) if args.eval_interval else 0
    num_samples = (args.train_iters * gbs, max(1, evals) * args.eval_iters * gbs, None)
    # collective: Megatron's builder lets rank 0 build the index caches first
    # Every rank reads its own samples (no TP broadcast), so every rank builds.
    train, valid, _ = build_gpt_datasets(data_path, args.split, args.seq_length, args.seed, tokenizer, num_samples,
                                         cache, is_built_on_rank=lambda: True)
    return train, (valid if args.eval_interval else None), tokenizer


def _on_rank0_first(fn):
    """Run ``fn`` on rank 0, then on the others: caches are built once."""
    if dist.get_rank() == 0:
        out = fn()
        dist.barrier()
    else:
        dist.barrier()
        out = fn()
    return out


def _tflops(n_params: float, args, tokens: int, seconds: float) -> float:
    # 6 N per token for the dense matmuls (fwd + bwd), plus attention scores
    attention = 12 * args.num_layers * args.hidden_size * args.seq_length
    return (6 * n_params + attention) * tokens / seconds / 1e12


def _mem_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _moe_aux_loss(num_micro: int) -> float:
    from megatron.core.transformer.moe import moe_utils

    moe_utils.reduce_aux_losses_tracker_across_ranks()
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    total = sum(float(v["values"].sum()) for v in tracker.values() if "values" in v) / max(num_micro, 1)
    moe_utils.clear_aux_losses_tracker()
    return total
