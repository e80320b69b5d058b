"""The Hugging Face side: config building/checking, safetensors shards, the tokenizer."""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Optional

import torch

from .layout import ConversionError
from .megatron_side import DEFAULT_EPS, DEFAULT_ROTARY_BASE

WEIGHTS_INDEX = "model.safetensors.index.json"


DEFAULT_SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}  # no tokenizer known


def hf_config(model: dict, vocab_size: int, dtype: torch.dtype, special_ids: Optional[dict] = None):
    """A ``LlamaConfig`` (dense) or ``MixtralConfig`` (MoE) for Megatron ``model`` settings.

    ``special_ids``: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` (the tokenizer's; default
    :data:`DEFAULT_SPECIAL_IDS`)."""
    from transformers import LlamaConfig, MixtralConfig

    ids = {**DEFAULT_SPECIAL_IDS, **(special_ids or {})}

    heads, hidden = model["num_attention_heads"], model["hidden_size"]
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=model["ffn_hidden_size"],
                  num_hidden_layers=model["num_layers"], num_attention_heads=heads,
                  num_key_value_heads=model["num_query_groups"], head_dim=hidden // heads, hidden_act="silu",
                  max_position_embeddings=int(model.get("max_position_embeddings") or model["seq_length"]),
                  rms_norm_eps=float(model.get("norm_epsilon", model.get("layernorm_epsilon", DEFAULT_EPS))),
                  rope_parameters={"rope_type": "default",
                                   "rope_theta": float(model.get("rotary_base", DEFAULT_ROTARY_BASE))},
                  initializer_range=float(model.get("init_method_std", 0.02)),
                  tie_word_embeddings=not model.get("untie_embeddings_and_output_weights", False),
                  attention_dropout=0.0, **ids)
    if model.get("num_experts"):
        cfg = MixtralConfig(num_local_experts=model["num_experts"], num_experts_per_tok=model["moe_router_topk"],
                            router_jitter_noise=0.0, output_router_logits=False, sliding_window=None, **common)
    else:
        cfg = LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    cfg.dtype = dtype
    cfg.architectures = ["MixtralForCausalLM" if model.get("num_experts") else "LlamaForCausalLM"]
    return cfg


def _rope_theta(cfg) -> float:
    rp = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(rp, dict) and "rope_theta" in rp:
        rtype = rp.get("rope_type", "default")
        if rtype != "default":
            raise ConversionError(f"rope scaling {rtype!r} is not supported (Megatron's GPTModel here uses plain "
                                  "RoPE)")
        return float(rp["rope_theta"])
    if getattr(cfg, "rope_scaling", None):
        raise ConversionError(f"rope scaling {cfg.rope_scaling} is not supported")
    return float(getattr(cfg, "rope_theta", DEFAULT_ROTARY_BASE))


def megatron_settings_from_hf(cfg, tp: int, pp: int, dp: int, divisible_by: int, seq_length=None) -> dict:
    """The trainer's ``model_settings()`` fields for an HF Llama/Mixtral config; refuses what it cannot express."""
    mt = getattr(cfg, "model_type", None)
    if mt not in ("llama", "mixtral"):
        raise ConversionError(f"model_type {mt!r} is not supported (llama and mixtral are)")
    problems = []
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        problems.append("biases (attention_bias/mlp_bias)")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg.hidden_act} (SwiGLU needs silu)")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        problems.append(f"head_dim={head_dim} != hidden_size / num_attention_heads")
    if getattr(cfg, "sliding_window", None):
        problems.append(f"sliding_window={cfg.sliding_window}")
    if mt == "mixtral" and getattr(cfg, "router_jitter_noise", 0.0):
        problems.append(f"router_jitter_noise={cfg.router_jitter_noise}")
    try:
        theta = _rope_theta(cfg)
    except ConversionError as e:
        problems.append(str(e))
        theta = DEFAULT_ROTARY_BASE
    if problems:
        raise ConversionError("cannot convert this HF model faithfully:\n  - " + "\n  - ".join(problems))
    for name, size in (("layers", cfg.num_hidden_layers),):
        if size % pp:
            raise ConversionError(f"{size} {name} cannot be split over {pp} pipeline stages")
    if cfg.num_key_value_heads % tp:
        raise ConversionError(f"num_key_value_heads={cfg.num_key_value_heads} is not divisible by TP={tp}")
    multiple = divisible_by * tp
    padded = -(-cfg.vocab_size // multiple) * multiple
    experts = getattr(cfg, "num_local_experts", None) if mt == "mixtral" else None
    settings = {
        "num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.intermediate_size, "num_attention_heads": cfg.num_attention_heads,
        "num_query_groups": cfg.num_key_value_heads, "normalization": "RMSNorm",
        "swiglu": True, "untie_embeddings_and_output_weights": not cfg.tie_word_embeddings,
        "position_embedding_type": "rope", "num_experts": experts,
        "moe_router_topk": cfg.num_experts_per_tok if experts else 2,
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "context_parallel_size": 1,
        "deepspeed": False, "padded_vocab_size": padded, "data_parallel_size": dp,
    }
    # `train --load` must match these (it names the flags when it does not; --use-checkpoint-args sets them)
    settings.update(rotary_base=theta, norm_epsilon=float(cfg.rms_norm_eps),
                    max_position_embeddings=int(cfg.max_position_embeddings),
                    init_method_std=float(getattr(cfg, "initializer_range", 0.02)))
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
