"""Parameter roles by name: TransformerEngine's fused norm names must be seen as norms (issue 14, item 3)."""

import pytest
import torch
from torch import nn

from megatron_simreg.megatron.init import init_params_by_global_name
from megatron_simreg.megatron.param_names import BIAS, MATRIX, NORM, OUTPUT_PROJ, local_spec_name, param_role


def _module(**params):
    m = nn.Module()
    for name, shape in params.items():
        m.register_parameter(name, nn.Parameter(torch.empty(shape)))
    return m


class _TELayer(nn.Module):
    """The parameter names of one layer built with megatron-core's TE spec (dense)."""

    def __init__(self, layer_number, h=8):
        super().__init__()
        self.layer_number = layer_number
        self.self_attention = nn.Module()
        self.self_attention.linear_qkv = _module(weight=(3 * h, h), layer_norm_weight=(h,))
        self.self_attention.linear_proj = _module(weight=(h, h))
        self.mlp = nn.Module()
        self.mlp.linear_fc1 = _module(weight=(4 * h, h), layer_norm_weight=(h,))
        self.mlp.linear_fc2 = _module(weight=(h, 4 * h))


class _TEGPT(nn.Module):
    def __init__(self, h=8):
        super().__init__()
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList([_TELayer(1, h), _TELayer(2, h)])
        self.decoder.final_layernorm = _module(weight=(h,))


def test_te_fused_norm_gains_start_at_one():
    model = _TEGPT()
    init_params_by_global_name(model, seed=3, std=0.02, num_layers=2)
    for name, p in model.named_parameters():
        if "layer_norm_weight" in name or "final_layernorm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert p.std() > 0.001, name


@pytest.mark.parametrize("name,role", [
    ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", NORM),
    ("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", NORM),
    ("decoder.layers.0.self_attention.linear_qkv.layer_norm_bias", BIAS),
    ("decoder.layers.0.input_layernorm.weight", NORM),
    ("decoder.layers.0.pre_mlp_layernorm.weight", NORM),
    ("decoder.layers.0.self_attention.q_layernorm.weight", NORM),
    ("decoder.final_layernorm.weight", NORM),
    ("decoder.layers.0.self_attention.linear_qkv.weight", MATRIX),
    ("decoder.layers.0.self_attention.linear_qkv.bias", BIAS),
    ("decoder.layers.0.self_attention.linear_proj.weight", OUTPUT_PROJ),
    ("decoder.layers.0.mlp.experts.linear_fc2.weight3", OUTPUT_PROJ),
    ("decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight", OUTPUT_PROJ),
    ("decoder.layers.0.mlp.router.weight", MATRIX),
    ("embedding.word_embeddings.weight", MATRIX),
])
def test_param_role(name, role):
    assert param_role(name) == role


def test_conversion_and_init_share_the_te_mapping():
    from megatron_simreg.conversion.layout import normalize_megatron_names

    te = {"decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": torch.ones(2),
          "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": torch.ones(2)}
    assert sorted(normalize_megatron_names(te)) == ["decoder.layers.0.input_layernorm.weight",
                                                    "decoder.layers.0.pre_mlp_layernorm.weight"]
    assert all(local_spec_name(k) in normalize_megatron_names(te) for k in te)
