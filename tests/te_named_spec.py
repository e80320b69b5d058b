"""TEST-ONLY: a CPU layer spec whose parameter names are TransformerEngine's (issue 23, item 1).

TransformerEngine cannot run on CPU, yet what breaks conversions on a GPU with TE is only its naming:
``get_gpt_layer_with_transformer_engine_spec`` fuses the pre-attention and (dense) pre-MLP norms into the
linear that follows them (``TELayerNormColumnParallelLinear``), so their gains live at
``self_attention.linear_qkv.layer_norm_weight`` / ``mlp.linear_fc1.layer_norm_weight`` and the layer's
``input_layernorm`` / ``pre_mlp_layernorm`` are ``IdentityOp``. With MoE, TE keeps ``pre_mlp_layernorm`` a
norm module (only ``linear_qkv`` is fused), as this spec does.

:class:`LayerNormColumnParallelLinear` reproduces that structure with megatron-core's own
``ColumnParallelLinear``: an RMSNorm (``torch.nn.functional.rms_norm``, the function ``torch.nn.RMSNorm``
and so our CPU spec's ``CPUTorchNorm`` call, with the layer's epsilon) applied to the input, then the matmul.
The arithmetic is therefore op for op that of the local CPU spec; only the names differ. Not TE's kernels:
nothing here says anything about TE's numerics. Never import this outside tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear


class LayerNormColumnParallelLinear(ColumnParallelLinear):
    """``ColumnParallelLinear`` with a fused RMSNorm in front, parameter named as TE's ``layer_norm_weight``."""

    def __init__(self, input_size, output_size, *, config, **kwargs):
        if config.normalization != "RMSNorm":
            raise ValueError("the test-only TE-named spec supports RMSNorm only")
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
        setattr(self.layer_norm_weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, input_, weight=None, runtime_gather_output=None):
        normed = F.rms_norm(input_, (input_.shape[-1],), self.layer_norm_weight, self.eps)
        return super().forward(normed, weight=weight, runtime_gather_output=runtime_gather_output)


def te_named_layer_spec(config):
    """Drop-in for ``megatron_simreg.megatron.model.layer_spec`` (monkeypatch it) on CPU: TE's names."""
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_simreg.megatron.cpu_compat import get_cpu_gpt_layer_spec

    spec = get_cpu_gpt_layer_spec(num_experts=config.num_moe_experts, normalization=config.normalization,
                                  qk_layernorm=config.qk_layernorm)
    layer = spec.submodules
    layer.input_layernorm = IdentityOp
    layer.self_attention.submodules.linear_qkv = LayerNormColumnParallelLinear
    if not config.num_moe_experts:  # TE: dense MLPs fuse the pre-MLP norm too; MoE keeps a norm module
        layer.pre_mlp_layernorm = IdentityOp
        layer.mlp.submodules.linear_fc1 = LayerNormColumnParallelLinear
    # TE's names need no mapping for dist_checkpointing: the local spec's map exists to produce these keys
    layer.sharded_state_dict_keys_map = {}
    return spec
