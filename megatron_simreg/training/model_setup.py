"""The model a run trains: its Megatron-core GPTModel built from Megatron-LM flags, and what a checkpoint records."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


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
        recompute_num_layers=args.recompute_num_layers, calculate_per_token_loss=args.calculate_per_token_loss,
        deallocate_pipeline_outputs=True,  # Megatron-LM's default: frees each stage's output once sent
        **moe,
    )
    return build_gpt(shape, config, position_embedding_type=args.position_embedding_type), config
