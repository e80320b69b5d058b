"""The model a run trains: its Megatron-core GPTModel built from Megatron-LM flags, and what a checkpoint records."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


# model_settings() fields that describe the model: a resume must match them (checkpoint.check_compatible), and
# --use-checkpoint-args sets their flags from the checkpoint. Each with the value a checkpoint written before the
# field was recorded had (None: the checkpoint's seq_length).
MODEL_KEYS = {"num_layers": None, "hidden_size": None, "ffn_hidden_size": None, "num_attention_heads": None,
              "num_query_groups": None, "normalization": "RMSNorm", "swiglu": False,
              "untie_embeddings_and_output_weights": False, "position_embedding_type": "rope", "num_experts": None,
              "moe_router_topk": 2, "rotary_base": 10000.0, "norm_epsilon": 1e-5, "max_position_embeddings": None,
              "kv_channels": None, "add_qkv_bias": False, "qk_layernorm": False, "moe_ffn_hidden_size": None,
              "moe_router_pre_softmax": False, "use_rope_scaling": False, "rope_scaling_factor": None}
# recorded but free to change on resume: the training sequence length, the initialization's std
FREE_KEYS = ("seq_length", "init_method_std")
# flags of the model_settings() fields that are not plain --field-name VALUE
BOOL_KEYS = ("swiglu", "untie_embeddings_and_output_weights", "deepspeed", "add_qkv_bias", "qk_layernorm",
             "moe_router_pre_softmax", "use_rope_scaling")


def model_settings(args, vocab_size: int) -> dict:
    """The model (and layout) a checkpoint records; a resume must match the model (see checkpoint.check_compatible)."""
    keys = (*MODEL_KEYS, *FREE_KEYS, "tensor_model_parallel_size", "pipeline_model_parallel_size",
            "context_parallel_size", "deepspeed")
    out = {k: getattr(args, k) for k in keys}
    out["ffn_hidden_size"] = ffn_hidden_size(args)
    out["num_query_groups"] = args.num_query_groups or args.num_attention_heads
    # the effective values, so that a flag given at its default compares equal to one left out
    out["kv_channels"] = args.kv_channels or args.hidden_size // args.num_attention_heads
    out["moe_ffn_hidden_size"] = (args.moe_ffn_hidden_size or out["ffn_hidden_size"]) if args.num_experts else None
    out["rope_scaling_factor"] = args.rope_scaling_factor if args.use_rope_scaling else None
    out["padded_vocab_size"] = vocab_size
    out["data_parallel_size"] = dist.get_world_size() // (
        args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size)
    return out


def normalized(model: dict) -> dict:
    """A checkpoint's ``meta.json`` ``model`` settings with the fields an older checkpoint lacks at the value it
    was trained with (import-hf once wrote ``layernorm_epsilon``, and only when not 1e-5)."""
    out = dict(model)
    if "layernorm_epsilon" in out:
        out.setdefault("norm_epsilon", out.pop("layernorm_epsilon"))
    for k, default in MODEL_KEYS.items():
        if k not in out and default is not None:
            out[k] = default
    if out.get("max_position_embeddings") is None and out.get("seq_length") is not None:
        out["max_position_embeddings"] = out["seq_length"]
    if out.get("kv_channels") is None and out.get("hidden_size"):
        out["kv_channels"] = out["hidden_size"] // out["num_attention_heads"]
    if out.get("moe_ffn_hidden_size") is None and out.get("num_experts"):
        out["moe_ffn_hidden_size"] = out["ffn_hidden_size"]
    return out


def flag(key: str, value) -> str:
    """The command-line flag that sets ``model_settings()[key]`` to ``value``."""
    name = "--" + key.replace("_", "-")
    if key in BOOL_KEYS:
        return name if value else f"(no {name})"
    if value is None:
        return f"(no {name})"
    if isinstance(value, float):
        value = int(value) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return f"{name} {value}"


def implied_values(model: dict) -> dict:
    """The values that leaving a flag out gives, for the fields whose default depends on other flags."""
    return {"kv_channels": model["hidden_size"] // model["num_attention_heads"],
            "moe_ffn_hidden_size": model["ffn_hidden_size"] if model.get("num_experts") else None}


def model_flags(model: dict) -> str:
    """``model`` settings as the train flags that build that model, one pasteable string."""
    model = normalized(model)
    implied = implied_values(model)
    parts = []
    for k in MODEL_KEYS:
        v = model.get(k)
        if k in BOOL_KEYS and not v or v is None or (k == "moe_router_topk" and not model.get("num_experts")):
            continue
        if implied.get(k) == v:
            continue
        parts.append(flag(k, v))
    if model.get("init_method_std") is not None:  # recorded, free to change: the std of a fresh initialization
        parts.append(flag("init_method_std", model["init_method_std"]))
    return " ".join(parts)


def padded_vocab(vocab: int, args) -> int:
    """The embedding's rows: the checkpoint's with --use-checkpoint-args (Megatron-LM's rule: an imported model keeps
    its vocabulary, e.g. Qwen's 151936 rows for 151665 tokens), else ``vocab`` rounded up to a multiple of
    --make-vocab-size-divisible-by x --tensor-model-parallel-size."""
    tp = args.tensor_model_parallel_size
    rows = getattr(args, "padded_vocab_size", None)
    if rows:
        if rows % tp:
            raise ValueError(f"the checkpoint's vocabulary ({rows} rows) cannot be split over "
                             f"--tensor-model-parallel-size {tp}; pick a TP size that divides it")
        return rows
    multiple = args.make_vocab_size_divisible_by * tp
    return int(math.ceil(vocab / multiple) * multiple)


def ffn_hidden_size(args) -> int:
    """``--ffn-hidden-size``, else 4h, or 8h/3 rounded up to a multiple of 64 with SwiGLU (Llama's rule)."""
    return args.ffn_hidden_size or (int(8 * args.hidden_size / 3 + 63) // 64 * 64 if args.swiglu else 4 * args.hidden_size)


def architecture(model: dict):
    """``(GPTShape, TransformerConfig overrides, position_embedding_type)`` of ``model`` settings (a
    ``model_settings()`` dict or a checkpoint's ``meta.json`` ``model``): everything that defines the network."""
    import torch.nn.functional as F

    from ..megatron.model import GPTShape

    model = normalized(model)
    shape = GPTShape(num_layers=model["num_layers"], hidden_size=model["hidden_size"],
                     ffn_hidden_size=model["ffn_hidden_size"], num_attention_heads=model["num_attention_heads"],
                     num_query_groups=model["num_query_groups"], vocab_size=model["padded_vocab_size"],
                     seq_length=model["max_position_embeddings"], num_experts=model.get("num_experts"),
                     moe_router_topk=model["moe_router_topk"],
                     untie_embeddings=model["untie_embeddings_and_output_weights"], rotary_base=model["rotary_base"],
                     kv_channels=model["kv_channels"], add_qkv_bias=model["add_qkv_bias"],
                     qk_layernorm=model["qk_layernorm"], moe_ffn_hidden_size=model.get("moe_ffn_hidden_size"),
                     moe_router_pre_softmax=model["moe_router_pre_softmax"],
                     rope_scaling_factor=model["rope_scaling_factor"] if model["use_rope_scaling"] else None)
    swiglu = model["swiglu"]
    overrides = dict(normalization=model["normalization"], layernorm_epsilon=model["norm_epsilon"],
                     gated_linear_unit=swiglu, activation_func=F.silu if swiglu else F.gelu)
    return shape, overrides, model["position_embedding_type"]


def build_model(args, vocab_size: int):
    from ..megatron.model import build_gpt, transformer_config, uses_te_spec

    if args.reset_attention_mask and uses_te_spec():
        raise ValueError("--reset-attention-mask needs an attention that takes an arbitrary [s, s] mask; "
                         "TransformerEngine's layer spec, used on this GPU, applies its own causal mask (its fused "
                         "and flash paths take no document mask). Train without --reset-attention-mask here.")

    shape, overrides, position_embedding_type = architecture(model_settings(args, vocab_size))
    moe = {}
    if args.num_experts:
        moe = dict(moe_aux_loss_coeff=args.moe_aux_loss_coeff,
                   moe_router_load_balancing_type="aux_loss" if args.moe_aux_loss_coeff > 0 else "none")
    config = transformer_config(
        shape, tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
        cp=args.context_parallel_size, sp=args.sequence_parallel,
        dtype=torch.bfloat16 if args.bf16 else torch.float32, init_method_std=args.init_method_std,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers, calculate_per_token_loss=args.calculate_per_token_loss,
        deallocate_pipeline_outputs=True,  # Megatron-LM's default: frees each stage's output once sent
        **overrides, **moe,
    )
    return build_gpt(shape, config, position_embedding_type=position_embedding_type), config
