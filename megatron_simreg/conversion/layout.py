"""The Megatron-core <-> Hugging Face tensor mapping (pure tensor code, no process groups).

"Full" Megatron state dicts here are the PP=1, TP=1 view: the global parameter
names a ``GPTModel`` with every layer would have, unsharded, and without the
``_extra_state`` entries. Megatron-backend checkpoints reach this view through
dist_checkpointing (loaded into a TP=1/PP=1 model, which reshards them);
:func:`merge_tp` builds it from DeepSpeed's per-TP-rank files.

The details that break conversions:

* Fused QKV (``linear_qkv.weight``, ``(heads + 2 * groups) * head_dim`` rows) is
  interleaved per query group: ``[q x heads_per_group, k, v]`` for each group
  (:func:`fuse_qkv` / :func:`split_qkv`); MQA is ``groups == 1``.
* SwiGLU ``linear_fc1.weight`` is ``cat(gate, up)`` in the full view; each TP
  rank holds ``cat(gate_r, up_r)`` (partition stride 2).
* TP shards are concatenated along the dimension their layer splits:
  column-parallel (QKV, fc1, embedding, output layer) along dim 0,
  row-parallel (``linear_proj``, ``linear_fc2``) along dim 1. Replicated
  tensors (norms, router) are taken from rank 0 after checking the ranks
  agree. Shards are never summed.
* Layer norms fused into linears under TransformerEngine's spec
  (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``) are read
  as ``input_layernorm`` / ``pre_mlp_layernorm``.
* Vocabulary padding: Megatron's rows beyond the tokenizer's size are dropped
  on export and zero-filled on import.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional

import torch

from ..megatron.param_names import local_spec_name

class ConversionError(RuntimeError):
    """A model or checkpoint that cannot be converted faithfully; the message names why."""


# ----------------------------------------------------------------------------
# QKV and SwiGLU
# ----------------------------------------------------------------------------


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """HF ``q_proj``/``k_proj``/``v_proj`` weights -> Megatron's per-group interleaved ``linear_qkv.weight``."""
    if num_heads % num_groups:
        raise ConversionError(f"num_attention_heads {num_heads} is not a multiple of num_query_groups {num_groups}")
    head_dim = q.shape[0] // num_heads
    if k.shape[0] != num_groups * head_dim or v.shape[0] != num_groups * head_dim:
        raise ConversionError(f"k/v projections have {k.shape[0]}/{v.shape[0]} rows, expected "
                              f"{num_groups} groups x head_dim {head_dim}")
    hidden = q.shape[1:]
    qg = q.reshape(num_groups, num_heads // num_groups * head_dim, *hidden)
    kg = k.reshape(num_groups, head_dim, *hidden)
    vg = v.reshape(num_groups, head_dim, *hidden)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *hidden)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int):
    """Megatron ``linear_qkv.weight`` -> ``(q, k, v)`` in HF's head order."""
    if num_heads % num_groups:
        raise ConversionError(f"num_attention_heads {num_heads} is not a multiple of num_query_groups {num_groups}")
    per_group = num_heads // num_groups
    rows = qkv.shape[0]
    if rows % (num_heads + 2 * num_groups):
        raise ConversionError(f"linear_qkv has {rows} rows, not a multiple of heads + 2 x groups "
                              f"= {num_heads + 2 * num_groups}")
    head_dim = rows // (num_heads + 2 * num_groups)
    hidden = qkv.shape[1:]
    g = qkv.reshape(num_groups, (per_group + 2) * head_dim, *hidden)
    q = g[:, : per_group * head_dim].reshape(num_heads * head_dim, *hidden)
    k = g[:, per_group * head_dim: (per_group + 1) * head_dim].reshape(num_groups * head_dim, *hidden)
    v = g[:, (per_group + 1) * head_dim:].reshape(num_groups * head_dim, *hidden)
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor):
    if fc1.shape[0] % 2:
        raise ConversionError(f"SwiGLU linear_fc1 has an odd number of rows ({fc1.shape[0]})")
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


# ----------------------------------------------------------------------------
# tensor parallelism
# ----------------------------------------------------------------------------

_COLUMN = ("linear_qkv.weight", "linear_fc1.weight", "word_embeddings.weight", "output_layer.weight")
_ROW = ("linear_proj.weight", "linear_fc2.weight")


def tp_rule(name: str, swiglu: bool):
    """``(dim, stride)`` along which ``name`` is TP-sharded, or ``None`` when it is replicated."""
    if name.endswith(_COLUMN):
        return 0, (2 if swiglu and name.endswith("linear_fc1.weight") else 1)
    if name.endswith(_ROW):
        return 1, 1
    if name.endswith("linear_qkv.bias"):  # --add-qkv-bias (Qwen2): split with its rows
        return 0, 1
    if name.endswith(".bias"):
        raise ConversionError(f"{name}: linear biases other than --add-qkv-bias's are not supported")
    return None


def _chunks(t: torch.Tensor, n: int, dim: int):
    if t.shape[dim] % n:
        raise ConversionError(f"cannot split a dimension of size {t.shape[dim]} into {n} equal parts")
    return torch.chunk(t, n, dim=dim)


def merge_tp(shards: List[Dict[str, torch.Tensor]], swiglu: bool) -> Dict[str, torch.Tensor]:
    """Per-TP-rank state dicts (same keys) -> one unsharded dict. Concatenates, never sums."""
    if len(shards) == 1:
        return dict(shards[0])
    keys = list(shards[0])
    for r, s in enumerate(shards[1:], 1):
        if set(s) != set(keys):
            raise ConversionError(f"TP rank {r} holds different tensors than rank 0: "
                                  f"{sorted(set(s) ^ set(keys))[:5]}")
    out = {}
    for k in keys:
        rule = tp_rule(k, swiglu)
        ts = [s[k] for s in shards]
        if rule is None:
            for r, t in enumerate(ts[1:], 1):
                if t.shape != ts[0].shape or not torch.equal(t, ts[0]):
                    raise ConversionError(f"{k} should be replicated across TP ranks but rank {r} differs from "
                                          "rank 0")
            out[k] = ts[0]
            continue
        dim, stride = rule
        per = [_chunks(t, stride, dim) for t in ts]
        out[k] = torch.cat([per[r][s] for s in range(stride) for r in range(len(ts))], dim=dim)
    return out


# ----------------------------------------------------------------------------
# name normalisation (TE spec, grouped experts)
# ----------------------------------------------------------------------------


def normalize_megatron_name(k: str) -> str:
    """The full view's (local spec's) name of one GPTModel tensor name of either spec: TE's fused norms
    (via :func:`~..megatron.param_names.local_spec_name`, the one name map) and TE's grouped-GEMM experts."""
    if k.endswith("layer_norm_bias"):
        raise ConversionError(f"{k}: a LayerNorm bias; only RMSNorm models can be converted")
    k = local_spec_name(k)
    m = re.match(r"^(.*\.mlp\.experts)\.(linear_fc[12])\.weight(\d+)$", k)
    if m:  # TEGroupedMLP: experts.linear_fc1.weight{e}
        k = f"{m.group(1)}.local_experts.{m.group(3)}.{m.group(2)}.weight"
    if re.search(r"\.mlp\.experts\.weight[12]$", k):
        raise ConversionError(f"{k}: legacy GroupedMLP expert weights (moe_grouped_gemm without TE) are not "
                              "supported; save with the local or TE spec")
    return k


def megatron_name_map(sd: Dict[str, object]) -> Dict[str, str]:
    """``{full-view name: the model's own name}`` for the tensors of a GPTModel state dict (either spec), without
    ``_extra_state``; raises when two of the model's names would be the same full-view tensor."""
    names: Dict[str, str] = {}
    for k, t in sd.items():
        if k.endswith("_extra_state") or not isinstance(t, torch.Tensor):
            continue
        n = normalize_megatron_name(k)
        if n in names:
            raise ConversionError(f"the model has both {names[n]} and {k}, which are the same tensor {n} in the "
                                  "full view; cannot tell which to use")
        names[n] = k
    return names


def normalize_megatron_names(sd: Dict[str, torch.Tensor], num_experts: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Drop ``_extra_state``; map TE-spec fused norms and TE grouped-GEMM expert names to the local spec's."""
    return {n: sd[k] for n, k in megatron_name_map(sd).items()}


# ----------------------------------------------------------------------------
# Megatron <-> HF
# ----------------------------------------------------------------------------


def hf_model_type(model: dict, sd: Optional[Dict[str, torch.Tensor]] = None) -> str:
    """The HF ``model_type`` that expresses Megatron ``model`` settings (normalized): llama, qwen2 (QKV bias),
    qwen3 (QK-norm), mixtral or qwen3_moe (QK-norm); raises :class:`ConversionError` naming each feature none
    of them has (in the settings, or in the state dict ``sd`` when given)."""
    problems = []
    if model["normalization"] != "RMSNorm":
        problems.append(f"normalization={model['normalization']}: the HF architectures here use RMSNorm")
    if model["position_embedding_type"] != "rope":
        problems.append(f"position_embedding_type={model['position_embedding_type']} (learned absolute positions): "
                        "the HF architectures here use rotary embeddings")
    if not model["swiglu"]:
        problems.append("a GELU MLP (trained without --swiglu): the HF architectures here use SwiGLU")
    bias, qk, moe = model["add_qkv_bias"], model["qk_layernorm"], bool(model.get("num_experts"))
    if sd is not None:  # what the tensors hold beyond the settings
        biases = [k for k in sd if k.endswith(".bias") and not (bias and k.endswith("linear_qkv.bias"))]
        if biases:
            problems.append(f"biases ({biases[0]} and {len(biases) - 1} more): only --add-qkv-bias's q/k/v biases "
                            "(Qwen2) convert")
        norms = [k for k in sd if "q_layernorm" in k or "k_layernorm" in k]
        if norms and not qk:
            problems.append(f"QK layer norm ({norms[0]}) though the settings have no --qk-layernorm")
        if any("shared_expert" in k for k in sd):
            problems.append("shared experts: no supported HF architecture has them")
    if bias and (qk or moe):
        problems.append("--add-qkv-bias with " + ("--qk-layernorm" if qk else "MoE") + ": no supported HF "
                        "architecture has both (Qwen2 has QKV biases, Qwen3 and Qwen3-MoE QK-norm)")
    if moe and not qk and model["moe_router_pre_softmax"]:
        problems.append("--moe-router-pre-softmax without --qk-layernorm: Mixtral renormalises its top-k weights")
    if problems:
        raise ConversionError("cannot convert this checkpoint faithfully:\n  - " + "\n  - ".join(problems))
    if moe:
        return "qwen3_moe" if qk else "mixtral"
    return "qwen3" if qk else "qwen2" if bias else "llama"


def megatron_to_hf(sd: Dict[str, torch.Tensor], model: dict, vocab_size: int) -> Dict[str, torch.Tensor]:
    """Full Megatron state dict -> HF state dict (transformers 5 names) of :func:`hf_model_type`'s architecture."""
    from ..training.model_setup import normalized

    model = normalized(model)
    hf_model_type(model, sd)
    L, heads, groups = model["num_layers"], model["num_attention_heads"], model["num_query_groups"]
    experts = model.get("num_experts")
    tied = not model["untie_embeddings_and_output_weights"]
    used = set()

    def take(k):
        if k not in sd:
            raise ConversionError(f"the checkpoint has no {k}; it is partial or not a GPT model of these settings")
        used.add(k)
        return sd[k]

    hf = {"model.embed_tokens.weight": take("embedding.word_embeddings.weight")[:vocab_size]}
    for i in range(L):
        p, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        hf[h + "input_layernorm.weight"] = take(p + "input_layernorm.weight")
        for part in ("weight", "bias") if model["add_qkv_bias"] else ("weight",):
            q, k, v = split_qkv(take(f"{p}self_attention.linear_qkv.{part}"), heads, groups)
            for name, t in zip("qkv", (q, k, v)):
                hf[f"{h}self_attn.{name}_proj.{part}"] = t
        if model["qk_layernorm"]:
            hf[h + "self_attn.q_norm.weight"] = take(p + "self_attention.q_layernorm.weight")
            hf[h + "self_attn.k_norm.weight"] = take(p + "self_attention.k_layernorm.weight")
        hf[h + "self_attn.o_proj.weight"] = take(p + "self_attention.linear_proj.weight")
        hf[h + "post_attention_layernorm.weight"] = take(p + "pre_mlp_layernorm.weight")
        if experts:
            hf[h + "mlp.gate.weight"] = take(p + "mlp.router.weight")
            fc1 = [take(f"{p}mlp.experts.local_experts.{e}.linear_fc1.weight") for e in range(experts)]
            fc2 = [take(f"{p}mlp.experts.local_experts.{e}.linear_fc2.weight") for e in range(experts)]
            hf[h + "mlp.experts.gate_up_proj"] = torch.stack(fc1)  # [E, 2I, H] = cat(gate, up) per expert
            hf[h + "mlp.experts.down_proj"] = torch.stack(fc2)  # [E, H, I]
        else:
            gate, up = split_gate_up(take(p + "mlp.linear_fc1.weight"))
            hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"] = gate, up
            hf[h + "mlp.down_proj.weight"] = take(p + "mlp.linear_fc2.weight")
    hf["model.norm.weight"] = take("decoder.final_layernorm.weight")
    if not tied:
        hf["lm_head.weight"] = take("output_layer.weight")[:vocab_size]
    left = sorted(set(sd) - used - {"output_layer.weight"})
    if left:
        raise ConversionError(f"tensors the conversion does not know (refusing to drop them): {left[:8]}")
    return {k: v.contiguous() for k, v in hf.items()}


def hf_to_megatron(hf: Dict[str, torch.Tensor], model: dict) -> Dict[str, torch.Tensor]:
    """HF state dict (transformers 5 names) -> full Megatron state dict, vocab padded."""
    from ..training.model_setup import normalized

    model = normalized(model)
    L, heads, groups = model["num_layers"], model["num_attention_heads"], model["num_query_groups"]
    experts = model.get("num_experts")
    tied = not model.get("untie_embeddings_and_output_weights", False)
    padded = model["padded_vocab_size"]
    used = set()

    def take(k):
        if k not in hf:
            raise ConversionError(f"the HF model has no {k}")
        used.add(k)
        return hf[k]

    def pad(t):
        if t.shape[0] > padded:
            raise ConversionError(f"vocabulary {t.shape[0]} exceeds padded size {padded}")
        return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])]) if t.shape[0] < padded else t

    sd = {"embedding.word_embeddings.weight": pad(take("model.embed_tokens.weight"))}
    for i in range(L):
        p, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = take(h + "input_layernorm.weight")
        for part in ("weight", "bias") if model["add_qkv_bias"] else ("weight",):
            sd[f"{p}self_attention.linear_qkv.{part}"] = fuse_qkv(
                *(take(f"{h}self_attn.{name}_proj.{part}") for name in "qkv"), heads, groups)
        if model["qk_layernorm"]:
            sd[p + "self_attention.q_layernorm.weight"] = take(h + "self_attn.q_norm.weight")
            sd[p + "self_attention.k_layernorm.weight"] = take(h + "self_attn.k_norm.weight")
        sd[p + "self_attention.linear_proj.weight"] = take(h + "self_attn.o_proj.weight")
        sd[p + "pre_mlp_layernorm.weight"] = take(h + "post_attention_layernorm.weight")
        if experts:
            sd[p + "mlp.router.weight"] = take(h + "mlp.gate.weight")
            gu, down = take(h + "mlp.experts.gate_up_proj"), take(h + "mlp.experts.down_proj")
            if gu.shape[0] != experts or down.shape[0] != experts:
                raise ConversionError(f"layer {i}: expected {experts} experts, found {gu.shape[0]}")
            for e in range(experts):
                sd[f"{p}mlp.experts.local_experts.{e}.linear_fc1.weight"] = gu[e].contiguous()
                sd[f"{p}mlp.experts.local_experts.{e}.linear_fc2.weight"] = down[e].contiguous()
        else:
            sd[p + "mlp.linear_fc1.weight"] = fuse_gate_up(take(h + "mlp.gate_proj.weight"),
                                                           take(h + "mlp.up_proj.weight"))
            sd[p + "mlp.linear_fc2.weight"] = take(h + "mlp.down_proj.weight")
    sd["decoder.final_layernorm.weight"] = take("model.norm.weight")
    if not tied:
        sd["output_layer.weight"] = pad(take("lm_head.weight"))
    left = sorted(k for k in set(hf) - used if not (tied and k == "lm_head.weight")
                  and "rotary_emb" not in k)
    if left:
        raise ConversionError(f"HF tensors the conversion does not know (refusing to drop them): {left[:8]}")
    return {k: v.contiguous() for k, v in sd.items()}
