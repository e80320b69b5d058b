"""The Hugging Face side: config building/checking (which HF architectures, and how they map to Megatron flags), safetensors shards, the tokenizer."""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Optional

import torch

from ..training.model_setup import MODEL_KEYS
from .layout import ConversionError, hf_model_type

WEIGHTS_INDEX = "model.safetensors.index.json"


DEFAULT_SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}  # no tokenizer known

# HF model_type -> how import-hf reads it; Mistral and TinyLlama/SmolLM (model_type llama) take the Llama path
ACCEPTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")
# the rope_parameters of Llama 3.x's rope_type "llama3" that megatron-core's RoPE scaling hard-codes
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def hf_config(model: dict, vocab_size: int, dtype: torch.dtype, special_ids: Optional[dict] = None):
    """The transformers config (Llama, Qwen2, Qwen3, Mixtral or Qwen3-MoE; :func:`~.layout.hf_model_type`
    picks) for Megatron ``model`` settings.

    ``special_ids``: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` (the tokenizer's; default
    :data:`DEFAULT_SPECIAL_IDS`)."""
    import transformers

    from ..training.model_setup import normalized

    model = normalized(model)
    kind = hf_model_type(model)
    rope = {"rope_type": "default", "rope_theta": float(model["rotary_base"])}
    if model["use_rope_scaling"]:
        rope.update(rope_type="llama3", factor=float(model["rope_scaling_factor"]), **LLAMA3_ROPE_FIXED)
    common = dict(vocab_size=vocab_size, hidden_size=model["hidden_size"], intermediate_size=model["ffn_hidden_size"],
                  num_hidden_layers=model["num_layers"], num_attention_heads=model["num_attention_heads"],
                  num_key_value_heads=model["num_query_groups"], head_dim=model["kv_channels"], hidden_act="silu",
                  max_position_embeddings=int(model["max_position_embeddings"]),
                  rms_norm_eps=float(model["norm_epsilon"]), rope_parameters=rope,
                  initializer_range=float(model.get("init_method_std") or 0.02),
                  tie_word_embeddings=not model["untie_embeddings_and_output_weights"], attention_dropout=0.0,
                  **{**DEFAULT_SPECIAL_IDS, **(special_ids or {})})
    moe = dict(num_experts_per_tok=model["moe_router_topk"], output_router_logits=False)
    if kind == "llama":
        cfg = transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(use_sliding_window=False, **common)
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(attention_bias=False, use_sliding_window=False, **common)
    elif kind == "mixtral":
        common["intermediate_size"] = model["moe_ffn_hidden_size"]  # Mixtral's is each expert's
        cfg = transformers.MixtralConfig(num_local_experts=model["num_experts"], router_jitter_noise=0.0,
                                         sliding_window=None, **moe, **common)
    else:  # qwen3_moe: every layer an MoE layer
        cfg = transformers.Qwen3MoeConfig(num_experts=model["num_experts"], moe_intermediate_size=model["moe_ffn_hidden_size"],
                                          norm_topk_prob=not model["moe_router_pre_softmax"], decoder_sparse_step=1,
                                          mlp_only_layers=[], attention_bias=False, use_sliding_window=False, **moe,
                                          **common)
    cfg.dtype = dtype
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    return cfg


def _rope(cfg) -> dict:
    """``rotary_base`` and, for Llama 3.x's scaling, ``use_rope_scaling`` / ``rope_scaling_factor``; raises
    :class:`ConversionError` naming a RoPE variant megatron-core cannot express."""
    rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    theta = float(rp.get("rope_theta", getattr(cfg, "rope_theta", MODEL_KEYS["rotary_base"])))
    rtype = rp.get("rope_type", rp.get("type", "default"))
    if rtype == "default":
        return {"rotary_base": theta}
    if rtype == "llama3":
        fixed = {k: rp.get(k) for k in LLAMA3_ROPE_FIXED}
        if any(fixed[k] is None or float(fixed[k]) != v for k, v in LLAMA3_ROPE_FIXED.items()):
            raise ConversionError(f"rope scaling 'llama3' with {fixed}: megatron-core's RoPE scaling supports only "
                                  f"{LLAMA3_ROPE_FIXED} (Llama 3.1/3.2's values)")
        return {"rotary_base": theta, "use_rope_scaling": True, "rope_scaling_factor": float(rp["factor"])}
    raise ConversionError(f"rope scaling {rtype!r} is not supported (plain RoPE and Llama 3's 'llama3' are)")


def megatron_settings_from_hf(cfg, tp: int, pp: int, dp: int, divisible_by: Optional[int], seq_length=None) -> dict:
    """The trainer's ``model_settings()`` fields for an HF config of an :data:`ACCEPTED_MODEL_TYPES` model;
    refuses, naming each feature, what Megatron's GPTModel here cannot express."""
    mt = getattr(cfg, "model_type", None)
    if mt not in ACCEPTED_MODEL_TYPES:
        hint = " (Qwen2-MoE has shared experts, which are not supported)" if mt == "qwen2_moe" else ""
        raise ConversionError(f"model_type {mt!r} is not supported{hint}; accepted: {', '.join(ACCEPTED_MODEL_TYPES)}")
    moe = mt in ("mixtral", "qwen3_moe")
    problems = []
    if mt in ("llama", "qwen3", "qwen3_moe") and getattr(cfg, "attention_bias", False):
        problems.append("attention_bias=True (q/k/v and o_proj biases; Megatron's --add-qkv-bias covers q/k/v only)")
    if getattr(cfg, "mlp_bias", False):
        problems.append("mlp_bias=True")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg.hidden_act} (SwiGLU needs silu)")
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", mt in ("mistral", "mixtral")) and window \
            and window < cfg.max_position_embeddings:
        problems.append(f"sliding_window={window} (sliding-window attention)")
    if mt == "mixtral" and getattr(cfg, "router_jitter_noise", 0.0):
        problems.append(f"router_jitter_noise={cfg.router_jitter_noise}")
    if mt == "qwen3_moe" and (getattr(cfg, "decoder_sparse_step", 1) != 1 or getattr(cfg, "mlp_only_layers", [])):
        problems.append(f"dense layers between the MoE layers (decoder_sparse_step={cfg.decoder_sparse_step}, "
                        f"mlp_only_layers={cfg.mlp_only_layers})")
    try:
        rope = _rope(cfg)
    except ConversionError as e:
        problems.append(str(e))
        rope = {}
    if problems:
        raise ConversionError("cannot convert this HF model faithfully:\n  - " + "\n  - ".join(problems))
    if cfg.num_hidden_layers % pp:
        raise ConversionError(f"{cfg.num_hidden_layers} layers cannot be split over {pp} pipeline stages")
    if cfg.num_key_value_heads % tp:
        raise ConversionError(f"num_key_value_heads={cfg.num_key_value_heads} is not divisible by TP={tp}")
    multiple = (divisible_by or 1) * tp
    experts = (cfg.num_local_experts if mt == "mixtral" else cfg.num_experts) if moe else None
    settings = {
        "num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.intermediate_size, "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_key_value_heads, "normalization": "RMSNorm",
        "swiglu": True, "untie_embeddings_and_output_weights": not cfg.tie_word_embeddings,
        "position_embedding_type": "rope", "num_experts": experts,
        "moe_router_topk": cfg.num_experts_per_tok if experts else 2,
        "kv_channels": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        "add_qkv_bias": mt == "qwen2", "qk_layernorm": mt in ("qwen3", "qwen3_moe"),
        "moe_ffn_hidden_size": (cfg.moe_intermediate_size if mt == "qwen3_moe" else cfg.intermediate_size)
        if moe else None,
        "moe_router_pre_softmax": mt == "qwen3_moe" and not cfg.norm_topk_prob,
        "use_rope_scaling": False, "rope_scaling_factor": None,
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "context_parallel_size": 1,
        "deepspeed": False, "padded_vocab_size": -(-cfg.vocab_size // multiple) * multiple, "data_parallel_size": dp,
    }
    # `train --load` must match these (it names the flags when it does not; --use-checkpoint-args sets them)
    settings.update(norm_epsilon=float(cfg.rms_norm_eps), max_position_embeddings=int(cfg.max_position_embeddings),
                    init_method_std=float(getattr(cfg, "initializer_range", 0.02)), **rope)
    if seq_length:  # only a recorded default: the training sequence length is each run's choice
        settings["seq_length"] = int(seq_length)
    return settings


def write_safetensors(state: Dict[str, torch.Tensor], out: str, max_shard_bytes: int = 2 * 2**30) -> None:
    """Shards ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    shards, cur, size = [], {}, 0
    for k in sorted(state):
        nbytes = state[k].numel() * state[k].element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = state[k].contiguous()
        size += nbytes
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    with open(os.path.join(out, WEIGHTS_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


def write_tokenizer(sp_model: str, out: str) -> int:
    """An HF fast tokenizer reproducing the sentencepiece model (BPE, byte fallback, no dummy prefix);
    ``tokenizer.model`` is copied too. Returns the vocabulary size."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    extractor = SentencePieceExtractor(sp_model)
    proto = extractor.proto
    norm = proto.normalizer_spec
    if norm.name not in ("identity",) and norm.precompiled_charsmap:
        raise ConversionError(f"{sp_model}: sentencepiece normalization {norm.name!r} is not supported by the "
                              "HF conversion (train with normalization_rule_name='identity')")
    unk = sp.id_to_piece(sp.unk_id())
    if proto.trainer_spec.model_type == 2:  # BPE
        kw = extractor.extract(BPE)
        model = BPE(vocab=kw["vocab"], merges=kw["merges"], unk_token=unk, fuse_unk=True,
                    byte_fallback=bool(proto.trainer_spec.byte_fallback))
    elif proto.trainer_spec.model_type == 1:  # unigram
        vocab = [(p.piece, p.score) for p in proto.pieces]
        model = Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=bool(proto.trainer_spec.byte_fallback))
    else:
        raise ConversionError(f"{sp_model}: sentencepiece model type {proto.trainer_spec.model_type} is not supported")
    tok = Tokenizer(model)
    steps = []
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("\u2581"))
    steps.append(normalizers.Replace(" ", "\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    specials = {"unk_token": unk}
    if sp.bos_id() >= 0:
        specials["bos_token"] = sp.id_to_piece(sp.bos_id())
    if sp.eos_id() >= 0:
        specials["eos_token"] = sp.id_to_piece(sp.eos_id())
    if sp.pad_id() >= 0:
        specials["pad_token"] = sp.id_to_piece(sp.pad_id())
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                   add_bos_token=False, add_eos_token=False, **specials)
    fast.add_special_tokens({"additional_special_tokens": []})
    fast.save_pretrained(out)
    shutil.copyfile(sp_model, os.path.join(out, "tokenizer.model"))
    return sp.vocab_size()


def copy_hf_tokenizer(src_dir: str, out: str) -> list:
    """Copy the Hugging Face tokenizer files of directory ``src_dir`` (``HF_TOKENIZER_FILES``) into ``out``;
    returns the names copied."""
    from ..data.tokenizer import hf_tokenizer_files

    names = []
    for path in hf_tokenizer_files(src_dir):
        shutil.copyfile(path, os.path.join(out, os.path.basename(path)))
        names.append(os.path.basename(path))
    return names
