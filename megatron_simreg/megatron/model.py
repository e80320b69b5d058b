"""Building a Megatron-core GPTModel from a few Megatron-LM-style settings.

On CPU the layer spec is the SP-capable local spec of :mod:`.cpu_compat`
(whose adaptations must be applied); on GPU it is TransformerEngine's spec
when TE is installed, else Megatron's local spec with the same SP-capable
torch norm (Megatron's ``WrappedTorchNorm`` refuses sequence parallelism,
which MoE with TP > 1 needs), in every layer and as the final norm. The
GPU-without-TE branch is tested on CPU by faking CUDA; unverified on GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import compat


@dataclass
class GPTShape:
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: Optional[int] = None  # default 4 * hidden (SwiGLU: 8/3 rounded is common; keep explicit)
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    vocab_size: int = 1024
    seq_length: int = 128  # GPTModel's max_sequence_length: the model's max_position_embeddings
    num_experts: Optional[int] = None
    moe_router_topk: int = 2
    untie_embeddings: bool = False
    rotary_base: float = 10000.0
    kv_channels: Optional[int] = None  # head dim; default hidden / heads (Qwen3 differs)
    add_qkv_bias: bool = False  # Qwen2
    qk_layernorm: bool = False  # Qwen3: RMSNorm over each head's q and k before RoPE
    moe_ffn_hidden_size: Optional[int] = None  # each expert's; default ffn_hidden_size
    moe_router_pre_softmax: bool = False  # softmax over all experts, then top-k (no renormalisation)
    rope_scaling_factor: Optional[float] = None  # Llama 3.x RoPE scaling; None: plain RoPE


def _has_apex_wgrad_fusion() -> bool:
    """NVIDIA apex's fused weight-gradient kernel, used by gradient_accumulation_fusion (optional)."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config(shape: GPTShape, *, tp=1, pp=1, cp=1, sp=False, dtype=torch.float32, **overrides):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size or 4 * shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        sequence_parallel=sp,
        kv_channels=shape.kv_channels,
        add_qkv_bias=shape.add_qkv_bias,
        qk_layernorm=shape.qk_layernorm,
    )
    if not on_gpu:  # these fusions are CUDA kernels
        kwargs.update(bias_dropout_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
                      apply_rope_fusion=False, persist_layer_norm=False)
    if not on_gpu or not _has_apex_wgrad_fusion():
        kwargs.update(gradient_accumulation_fusion=False)
    if shape.num_experts:
        kwargs.update(num_moe_experts=shape.num_experts, moe_router_topk=shape.moe_router_topk,
                      moe_token_dispatcher_type="allgather", moe_grouped_gemm=False,
                      moe_ffn_hidden_size=shape.moe_ffn_hidden_size, moe_router_pre_softmax=shape.moe_router_pre_softmax)
    kwargs.update(compat.transformer_config_defaults())
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def uses_te_spec() -> bool:
    """Whether :func:`layer_spec` picks TransformerEngine's layer spec here (CUDA and TE importable)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def layer_spec(config):
    """GPTModel's ``transformer_layer_spec`` for this machine (a block spec on a GPU without TE).

    Model-parallel state must be initialized. Importing :mod:`.cpu_compat`
    applies none of its CPU adaptations: only its norm and specs are used.
    """
    from .cpu_compat import get_cpu_gpt_block_spec, get_cpu_gpt_layer_spec

    if not torch.cuda.is_available():
        return get_cpu_gpt_layer_spec(num_experts=config.num_moe_experts, normalization=config.normalization,
                                      qk_layernorm=config.qk_layernorm)
    if not uses_te_spec():  # the block spec also carries the final norm, which Megatron would make a WrappedTorchNorm
        if config.num_moe_experts:
            compat.define_moe_te_gemm()
        return get_cpu_gpt_block_spec(config)
    from megatron.core.models.gpt import gpt_layer_specs as specs

    return specs.get_gpt_layer_with_transformer_engine_spec(num_experts=config.num_moe_experts,
                                                            qk_layernorm=config.qk_layernorm)


def build_gpt(shape: GPTShape, config, position_embedding_type: str = "rope"):
    """A GPTModel for this pipeline stage (model-parallel state must be initialized)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config),
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.seq_length,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not shape.untie_embeddings,
        position_embedding_type=position_embedding_type,
        rotary_base=shape.rotary_base,
        rope_scaling=shape.rope_scaling_factor is not None,
        rope_scaling_factor=shape.rope_scaling_factor or 8.0,
    )
    return model.cuda() if torch.cuda.is_available() else model
