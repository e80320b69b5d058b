"""import-hf / export-hf / --verify against a model whose parameters carry TransformerEngine's names (issue 23,
item 1), and the Megatron side's inputs on the model's device.

TE itself does not run on CPU: ``te_named_spec`` (test-only) builds the TE spec's structure (norms fused into
``linear_qkv`` / ``linear_fc1`` as ``layer_norm_weight``, ``IdentityOp`` in their place) from megatron-core's
own modules, and ``megatron_simreg.megatron.model.layer_spec`` is monkeypatched to it, so ``build_gpt`` returns
what it returns on a GPU with TE as far as names go. TE's kernels, and a real CUDA model, are unverified on GPU.

Tolerances. HF vs Megatron: ``verify.TOLERANCE`` (1e-4 max |dlogit|), the threshold ``--verify`` itself
applies. Both sides run fp32 and differ only in the order of float operations (one fused QKV matmul vs three,
RoPE tables computed differently, masked softmax): a few ulp (2**-24 ~ 6e-8 relative) per op on activations and
logits of order 1-10, compounding over 2 layers. Measured on these tiny models: 7.3e-6 (llama) and 4.1e-6
(mixtral), the same with either spec; 1e-4 leaves a >10x margin, while a wrong mapping (swapped gate/up, an
input norm gain left at 1) moves them by 5.4 and 2.1 and fails (``test_verify_fails_on_a_wrong_mapping``).
TE-named vs local-spec Megatron model: 0 (``torch.equal``): the shim computes ``F.rms_norm`` with the same
epsilon and then the same matmul as ``torch.nn.RMSNorm`` + ``ColumnParallelLinear``, the same fp32 CPU kernels
in the same order, so the logits must be bitwise identical; any difference means a tensor landed elsewhere.
"""

import json

import pytest
import torch

from te_named_spec import te_named_layer_spec
from test_conversion import _tiny_hf

from megatron_simreg.conversion.layout import ConversionError

LLAMA_TE = "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"


@pytest.fixture
def te_names(monkeypatch):
    from megatron_simreg.megatron import model

    monkeypatch.setattr(model, "layer_spec", te_named_layer_spec)


def _settings(ck):
    return json.load(open(ck / "iter_0000000" / "meta.json"))["model"]


def _build(settings, state=None):
    from megatron_simreg.conversion.megatron_side import SingleProcessMegatron, build_megatron_model

    with SingleProcessMegatron():
        return build_megatron_model(settings, state)


def test_the_test_spec_has_te_names(tmp_path, te_names):
    """The shim is what it claims: TE's names, no local-spec norm names in a dense model."""
    _tiny_hf("llama", tmp_path / "hf")
    from megatron_simreg.conversion.import_ import import_hf

    import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"), log=lambda *_: None)
    keys = set(_build(_settings(tmp_path / "ck")).state_dict())
    assert LLAMA_TE in keys and "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in keys
    assert not any(k.endswith(("input_layernorm.weight", "pre_mlp_layernorm.weight")) for k in keys)


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_import_verify_export_with_te_names(tmp_path, te_names, monkeypatch, kind):
    """The whole GPU user's path (import-hf --verify, export-hf --verify) with TE's parameter names."""
    from transformers import AutoModelForCausalLM

    from megatron_simreg.conversion.export import export_hf
    from megatron_simreg.conversion.import_ import import_hf
    from megatron_simreg.conversion.layout import hf_to_megatron
    from megatron_simreg.conversion.megatron_side import SingleProcessMegatron, build_megatron_model, megatron_logits
    from megatron_simreg.conversion.verify import TOLERANCE, verification_tokens
    from megatron_simreg.megatron import model as model_module

    src = _tiny_hf(kind, tmp_path / "hf")
    logs = []
    parity = import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"), verify=True, log=logs.append)
    assert parity is not None and parity.ok, logs
    assert parity.max_abs_logit_diff <= TOLERANCE
    settings = _settings(tmp_path / "ck")

    # the HF norm gains (random, != 1) are in TE's fused parameters, not left at their init of ones
    hf_sd = src.state_dict()
    full = hf_to_megatron({k: v.detach() for k, v in hf_sd.items()}, settings)
    tokens = verification_tokens(300, settings.get("seq_length") or settings["max_position_embeddings"])
    with SingleProcessMegatron():
        te = build_megatron_model(settings, full)
        own = te.state_dict()
        assert torch.equal(own[LLAMA_TE], hf_sd["model.layers.0.input_layernorm.weight"])
        if kind == "llama":
            assert torch.equal(own["decoder.layers.1.mlp.linear_fc1.layer_norm_weight"],
                               hf_sd["model.layers.1.post_attention_layernorm.weight"])
        te_logits = megatron_logits(te, tokens)
    monkeypatch.setattr(model_module, "layer_spec", _local_layer_spec)  # same weights, same math, local names
    with SingleProcessMegatron():
        local = build_megatron_model(settings, full)
        assert "decoder.layers.0.input_layernorm.weight" in local.state_dict()
        local_logits = megatron_logits(local, tokens)
    monkeypatch.setattr(model_module, "layer_spec", te_named_layer_spec)
    assert torch.equal(te_logits, local_logits)

    # export-hf --verify reads the checkpoint back through the TE-named model
    logs = []
    parity = export_hf(str(tmp_path / "ck"), str(tmp_path / "out"), verify=True, log=logs.append)
    assert parity is not None and parity.ok, logs
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for k, v in hf_sd.items():
        assert torch.equal(v, back.state_dict()[k]), k


def _local_layer_spec(config):
    from megatron_simreg.megatron.cpu_compat import get_cpu_gpt_layer_spec

    return get_cpu_gpt_layer_spec(num_experts=config.num_moe_experts, normalization=config.normalization,
                                  qk_layernorm=config.qk_layernorm)


def test_a_genuine_mismatch_is_a_clear_conversion_error(tmp_path, te_names):
    """Loading by the model's own names still refuses a state dict that does not fit, naming the tensor."""
    from megatron_simreg.conversion.layout import hf_to_megatron

    src = _tiny_hf("llama", tmp_path / "hf")
    from megatron_simreg.conversion.import_ import import_hf

    import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"), log=lambda *_: None)
    settings = _settings(tmp_path / "ck")
    full = hf_to_megatron({k: v.detach() for k, v in src.state_dict().items()}, settings)
    norm = "decoder.layers.0.input_layernorm.weight"

    with pytest.raises(ConversionError, match=r"missing \['decoder.layers.0.input_layernorm.weight'\]"):
        _build(settings, {k: v for k, v in full.items() if k != norm})
    with pytest.raises(ConversionError, match=r"unexpected \['decoder.layers.0.extra.weight'\]"):
        _build(settings, {**full, "decoder.layers.0.extra.weight": torch.ones(3)})
    with pytest.raises(ConversionError, match=r"decoder.layers.0.input_layernorm.weight.*shape"):
        _build(settings, {**full, norm: torch.ones(7)})


def test_name_map_sees_through_te_fused_norms_and_grouped_experts():
    """Every own name of a TE model maps to one full-view name; two own names on one full name are refused."""
    from megatron_simreg.conversion.layout import megatron_name_map

    t = torch.ones(1)
    own = {"decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": t,
           "decoder.layers.0.self_attention.linear_qkv.weight": t,
           "decoder.layers.0.self_attention.linear_qkv._extra_state": None,
           "decoder.layers.0.mlp.experts.linear_fc1.weight0": t,
           "decoder.layers.0.mlp.experts.linear_fc2.weight1": t,
           "decoder.layers.0.pre_mlp_layernorm.weight": t}
    assert megatron_name_map(own) == {
        "decoder.layers.0.input_layernorm.weight": "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.0.self_attention.linear_qkv.weight": "decoder.layers.0.self_attention.linear_qkv.weight",
        "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight":
            "decoder.layers.0.mlp.experts.linear_fc1.weight0",
        "decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight":
            "decoder.layers.0.mlp.experts.linear_fc2.weight1",
        "decoder.layers.0.pre_mlp_layernorm.weight": "decoder.layers.0.pre_mlp_layernorm.weight"}
    with pytest.raises(ConversionError, match="both"):
        megatron_name_map({"decoder.layers.0.input_layernorm.weight": t,
                           "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": t})


class _OnDevice(torch.nn.Module):
    """A GPTModel stand-in whose parameters live on ``device`` ('meta': no memory, no GPU): its forward refuses
    inputs on another device, as a CUDA model's first matmul would."""

    def __init__(self, device, vocab=11):
        super().__init__()
        self.w = torch.nn.Parameter(torch.empty(2, device=device))
        self.vocab = vocab
        self.seen = None

    def forward(self, tokens, position_ids, attention_mask):
        for name, t in (("tokens", tokens), ("position ids", position_ids)):
            assert t.device == self.w.device, f"{name} on {t.device}, the model on {self.w.device}"
        self.seen = (tokens.shape, position_ids.shape)
        return torch.zeros(*tokens.shape, self.vocab)  # a real tensor: the stub has no math to run on 'meta'


def test_megatron_logits_puts_inputs_on_the_model_device():
    from megatron_simreg.conversion.megatron_side import megatron_logits

    stub = _OnDevice("meta")
    tokens = torch.randint(0, 11, (2, 5))
    logits = megatron_logits(stub, tokens)
    assert stub.seen == (tokens.shape, tokens.shape)
    assert logits.device == tokens.device and logits.dtype == torch.float32 and logits.shape == (2, 5, 11)


@pytest.mark.parametrize("save_te", [True, False], ids=["te-to-local", "local-to-te"])
@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_a_checkpoint_moves_between_te_and_local_names(tmp_path, monkeypatch, kind, save_te):
    """A checkpoint written on a machine with TE reads on one without (a CPU, a GPU image without TE) and back.

    megatron-core's local spec maps ``pre_mlp_layernorm.`` to ``mlp.linear_fc1.layer_norm_`` in every layer, but
    TE's MoE spec keeps ``pre_mlp_layernorm.weight`` (only a dense MLP fuses that norm), so our spec keeps TE's
    MoE key. Exact: the same tensors are written and read, nothing is computed.
    """
    from megatron_simreg.conversion.import_ import import_hf
    from megatron_simreg.conversion.megatron_side import load_megatron_checkpoint
    from megatron_simreg.megatron import model

    _tiny_hf(kind, tmp_path / "hf")
    local = model.layer_spec
    monkeypatch.setattr(model, "layer_spec", te_named_layer_spec if save_te else local)
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ck"), log=lambda *_: None)
    saved = load_megatron_checkpoint(str(tmp_path / "ck"))[0]
    monkeypatch.setattr(model, "layer_spec", local if save_te else te_named_layer_spec)
    loaded = load_megatron_checkpoint(str(tmp_path / "ck"))[0]
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
