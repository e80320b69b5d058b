"""What a GPTModel parameter is, read from its name: one mapping for weight init and HF conversion.

The local layer spec and TransformerEngine's spec name the same tensors
differently. TE fuses the pre-attention and pre-MLP norms into the linear that
follows them, so their gains live at ``self_attention.linear_qkv.layer_norm_weight``
and ``mlp.linear_fc1.layer_norm_weight`` instead of ``input_layernorm.weight``
and ``pre_mlp_layernorm.weight``. Anything that decides by name (initialization,
conversion) must see through that, or it silently treats a norm gain as a
matrix: :func:`local_spec_name` maps TE's names to the local spec's, and
:func:`param_role` classifies a (global) name.
"""

from __future__ import annotations

# TE fused-norm suffix -> the local spec's name for the same tensor
TE_FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}

NORM = "norm_weight"
BIAS = "bias"  # linear biases and norm biases: zero at init
OUTPUT_PROJ = "output_proj"  # linear_proj / linear_fc2: Megatron's scaled init std / sqrt(2 L)
MATRIX = "matrix"  # every other weight: N(0, std)


def local_spec_name(name: str) -> str:
    """``name`` with TE's fused-norm parameter names replaced by the local spec's."""
    for te, local in TE_FUSED_NORMS.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def param_role(name: str) -> str:
    """One of :data:`NORM`, :data:`BIAS`, :data:`OUTPUT_PROJ`, :data:`MATRIX` for a parameter name (either spec)."""
    name = local_spec_name(name)
    if name.endswith("bias"):
        return BIAS
    last_module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if "layernorm" in last_module or last_module.endswith("norm"):  # input_layernorm, q_layernorm, final_layernorm
        return NORM
    if ".linear_proj." in name or ".linear_fc2." in name:
        return OUTPUT_PROJ
    return MATRIX
