"""Checkpoint conversion to and from Hugging Face (issue 5): layout unit tests, round trips with parity,
checkpoints trained by the real trainer (both backends), loading/generating with transformers, lm-eval, refusals."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_simreg.conversion.layout import ConversionError, fuse_qkv, megatron_to_hf, merge_tp, split_qkv
from megatron_simreg.megatron.init import _shard

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
        "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "2", "--swiglu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cmd(module, argv):
    """Run a conversion command in-process, as the CLI would: returns its exit code."""
    import importlib

    mod = importlib.import_module(module)
    p = argparse.ArgumentParser()
    mod.add_arguments(p)
    return mod.main(p.parse_args(argv))


def export_cmd(*argv):
    return _cmd("megatron_simreg.commands.export_hf", list(argv))


def import_cmd(*argv):
    return _cmd("megatron_simreg.commands.import_hf", list(argv))


def cli(*argv, timeout=300):
    out = subprocess.run([sys.executable, "-m", "megatron_simreg.cli", *argv], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout, env=ENV)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


# ----------------------------------------------------------------------------
# layout unit tests
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("heads,groups", [(8, 2), (8, 1), (4, 4)], ids=["gqa", "mqa", "mha"])
def test_qkv_interleave_per_query_group(heads, groups):
    d, h = 3, 5
    q = torch.arange(heads * d * h, dtype=torch.float32).reshape(heads * d, h)
    k = 1000 + torch.arange(groups * d * h, dtype=torch.float32).reshape(groups * d, h)
    v = 2000 + torch.arange(groups * d * h, dtype=torch.float32).reshape(groups * d, h)
    qkv = fuse_qkv(q, k, v, heads, groups)
    assert qkv.shape == ((heads + 2 * groups) * d, h)
    per = heads // groups
    blocks = qkv.reshape(groups, (per + 2) * d, h)
    for g in range(groups):  # [q x heads_per_group, k, v] for each group
        assert torch.equal(blocks[g, : per * d], q[g * per * d:(g + 1) * per * d])
        assert torch.equal(blocks[g, per * d:(per + 1) * d], k[g * d:(g + 1) * d])
        assert torch.equal(blocks[g, (per + 1) * d:], v[g * d:(g + 1) * d])
    q2, k2, v2 = split_qkv(qkv, heads, groups)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_tp_merge_concatenates_along_the_layer_axis_and_never_sums():
    tp = 2
    full = {
        "decoder.layers.0.self_attention.linear_qkv.weight": torch.randn(16, 4),
        "decoder.layers.0.self_attention.linear_proj.weight": torch.randn(4, 8),
        "decoder.layers.0.mlp.linear_fc1.weight": torch.randn(12, 4),
        "decoder.layers.0.mlp.linear_fc2.weight": torch.randn(4, 6),
        "decoder.layers.0.input_layernorm.weight": torch.randn(4),
        "embedding.word_embeddings.weight": torch.randn(10, 4),
    }
    # Megatron's own sharding (init.py, the partition_dim / partition_stride the layers declare)
    rules = {"linear_qkv": (0, 1), "linear_proj": (1, 1), "linear_fc1": (0, 2), "linear_fc2": (1, 1),
             "word_embeddings": (0, 1)}
    shards = [{} for _ in range(tp)]
    for name, t in full.items():
        rule = next((r for key, r in rules.items() if key in name), None)
        for r in range(tp):
            shards[r][name] = _shard(t, rule[0], rule[1], r, tp) if rule else t.clone()
    merged = merge_tp(shards, swiglu=True)
    for k in full:
        assert torch.equal(merged[k], full[k]), k
        if k.endswith("linear_proj.weight") or k.endswith("linear_fc2.weight"):
            assert not torch.allclose(merged[k][:, :1], shards[0][k][:, :1] + shards[1][k][:, :1])
    # SwiGLU: rank r holds cat(gate_r, up_r); the merged fc1 is cat(gate, up)
    gate, up = full["decoder.layers.0.mlp.linear_fc1.weight"].chunk(2)
    assert torch.equal(shards[1]["decoder.layers.0.mlp.linear_fc1.weight"], torch.cat([gate[3:], up[3:]]))
    # replicated tensors must agree across ranks
    shards[1]["decoder.layers.0.input_layernorm.weight"] = shards[1]["decoder.layers.0.input_layernorm.weight"] + 1
    with pytest.raises(ConversionError, match="replicated"):
        merge_tp(shards, swiglu=True)


# ----------------------------------------------------------------------------
# HF -> Megatron (TP=2) -> HF
# ----------------------------------------------------------------------------


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _tiny_hf(kind, path, tie=False):
    """A tiny random HF model of each accepted architecture, with its distinguishing features switched on."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    qwen3 = dict(head_dim=16)  # heads x head_dim = 64 != hidden 32, as in Qwen3-0.6B/4B: needs --kv-channels
    model = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**common)),
        # Llama 3.2's RoPE scaling: of head_dim 8's four frequencies one is smoothed and one divided by 32
        "llama3": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(rope_parameters=LLAMA3_ROPE, **common)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(sliding_window=None, **common)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)),
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**qwen3, **common)),
        "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                                                  **common)),
        "qwen3_moe": lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True, **qwen3, **common)),
        "qwen3_moe-no-renorm": lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=False, **qwen3,
            **common)),
    }[kind]()
    with torch.no_grad():
        for p in model.parameters():  # random norms and biases too, so a swapped one shows
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() > 1 else 1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model.eval()


ARCHITECTURES = {  # kind -> (PP, the flags import-hf must record, the exported architecture)
    "llama": (1, {}, "LlamaForCausalLM"),
    "llama3": (1, {"use_rope_scaling": True, "rope_scaling_factor": 32.0, "rotary_base": 500000.0},
               "LlamaForCausalLM"),
    "mistral": (1, {}, "LlamaForCausalLM"),
    "qwen2": (2, {"add_qkv_bias": True}, "Qwen2ForCausalLM"),
    "qwen3": (2, {"qk_layernorm": True, "kv_channels": 16}, "Qwen3ForCausalLM"),
    "mixtral": (1, {"num_experts": 4, "moe_ffn_hidden_size": 48}, "MixtralForCausalLM"),
    "qwen3_moe": (1, {"qk_layernorm": True, "kv_channels": 16, "moe_ffn_hidden_size": 24,
                      "moe_router_pre_softmax": False}, "Qwen3MoeForCausalLM"),
    "qwen3_moe-no-renorm": (1, {"moe_router_pre_softmax": True}, "Qwen3MoeForCausalLM"),
}


@pytest.mark.parametrize("kind,pp", [("llama", 2), *((k, v[0]) for k, v in ARCHITECTURES.items())],
                         ids=["llama-tp2-pp2", *(f"{k}-tp2" + ("-pp2" if v[0] == 2 else "")
                                                  for k, v in ARCHITECTURES.items())])
def test_hf_round_trip_identical_logits(tmp_path, kind, pp):
    from transformers import AutoModelForCausalLM

    src = _tiny_hf(kind, tmp_path / "hf", tie=(pp == 2))
    assert import_cmd("--hf", str(tmp_path / "hf"), "--save", str(tmp_path / "ck"), "--tensor-model-parallel-size",
                      "2", "--pipeline-model-parallel-size", str(pp), "--verify") == 0
    meta = json.load(open(tmp_path / "ck" / "iter_0000000" / "meta.json"))
    written = {p.name for p in (tmp_path / "ck" / "iter_0000000").iterdir()}  # dist_checkpointing, torch_dist
    assert {"metadata.json", "common.pt", ".metadata", "meta.json"} <= written and not any("rank_" in n for n in written)
    assert meta["model"]["padded_vocab_size"] == 300 and meta["model"]["tensor_model_parallel_size"] == 2
    _, recorded, architecture = ARCHITECTURES[kind]
    for key, value in recorded.items():
        assert meta["model"][key] == value, (key, meta["model"][key])
    assert export_cmd("--load", str(tmp_path / "ck"), "--out", str(tmp_path / "out"), "--verify") == 0
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert cfg["vocab_size"] == 300 and cfg["num_key_value_heads"] == 2
    assert cfg["architectures"] == [architecture]
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(src(x).logits, back(x).logits)
    for k, v in src.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


@pytest.mark.parametrize("kind,feature", [("llama3", "use_rope_scaling"), ("qwen3_moe-no-renorm",
                                                                        "moe_router_pre_softmax")])
def test_verify_fails_when_a_feature_is_not_carried(tmp_path, monkeypatch, kind, feature):
    """The round trips above are not vacuous: the RoPE scaling and the router's softmax change the logits."""
    from megatron_simreg.conversion import import_

    _tiny_hf(kind, tmp_path / "hf")
    real = import_.megatron_settings_from_hf
    monkeypatch.setattr(import_, "megatron_settings_from_hf", lambda *a, **k: {**real(*a, **k), feature: False})
    assert import_cmd("--hf", str(tmp_path / "hf"), "--save", str(tmp_path / "ck"), "--verify") == 1


def test_verify_fails_on_a_wrong_mapping(tmp_path, monkeypatch):
    """--verify is not a rubber stamp: a swapped gate/up gives a non-zero exit."""
    from megatron_simreg.conversion import layout

    _tiny_hf("llama", tmp_path / "hf")
    monkeypatch.setattr(layout, "fuse_gate_up", lambda gate, up: torch.cat([up, gate]))
    assert import_cmd("--hf", str(tmp_path / "hf"), "--save", str(tmp_path / "ck"), "--verify") == 1
    # ... and leaves no loadable wrong checkpoint behind, nor its staging directory
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_export_verify_failure_writes_nothing(tmp_path, monkeypatch, capsys):
    """A failed export parity check leaves --out as it was; a passing export into an existing --out keeps the
    files it does not write."""
    from megatron_simreg.conversion import layout

    _tiny_hf("llama", tmp_path / "hf")
    assert import_cmd("--hf", str(tmp_path / "hf"), "--save", str(tmp_path / "ck")) == 0
    with monkeypatch.context() as m:
        m.setattr(layout, "split_gate_up", lambda fc1: tuple(reversed(fc1.chunk(2))))
        assert export_cmd("--load", str(tmp_path / "ck"), "--out", str(tmp_path / "out"), "--verify") == 1
    assert sorted(os.listdir(tmp_path)) == ["ck", "hf"]
    assert "nothing was written" in capsys.readouterr().out
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert export_cmd("--load", str(tmp_path / "ck"), "--out", str(tmp_path / "out"), "--verify") == 0
    assert {"notes.txt", "config.json", "model.safetensors.index.json"} <= set(os.listdir(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["ck", "hf", "out"]


def test_import_refuses_a_non_empty_save(tmp_path, capsys):
    """import-hf never replaces or mixes with what --save holds; an empty directory is fine."""
    _tiny_hf("llama", tmp_path / "hf")
    ck = tmp_path / "ck"
    (ck / "iter_0000000").mkdir(parents=True)
    (ck / "iter_0000000" / "meta.json").write_text("{}")
    (ck / "latest_checkpointed_iteration.txt").write_text("0")
    capsys.readouterr()
    assert import_cmd("--hf", str(tmp_path / "hf"), "--save", str(ck)) == 2
    assert capsys.readouterr().err == (f"import-hf: error: --save {ck} is not empty (holds iter_0000000, "
                                       "latest_checkpointed_iteration.txt); import into a new directory\n")
    assert (ck / "iter_0000000" / "meta.json").read_text() == "{}"
    assert sorted(os.listdir(tmp_path)) == ["ck", "hf"]
    (tmp_path / "empty").mkdir()
    assert import_cmd("--hf", str(tmp_path / "hf"), "--save", str(tmp_path / "empty")) == 0
    assert (tmp_path / "empty" / "iter_0000000" / "meta.json").exists()


# ----------------------------------------------------------------------------
# checkpoints trained by the real trainer
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """Two tiny 2-iteration runs: Megatron backend (PP=2, tied embeddings) and DeepSpeed ZeRO-1 TP=2 + SP."""
    root = tmp_path_factory.mktemp("trained")
    base = ["train", *TINY, "--train-iters", "2", "--data-cache-path", cache]
    cli(*base, "--save", str(root / "megatron"), "--nproc-per-node", "2", "--pipeline-model-parallel-size", "2")
    cli(*base, "--save", str(root / "deepspeed"), "--nproc-per-node", "2", "--tensor-model-parallel-size", "2",
        "--sequence-parallel", "--deepspeed", "--zero-stage", "1")
    return root


@pytest.mark.parametrize("which", ["megatron", "deepspeed"])
def test_trained_checkpoint_exports_with_parity(trained, which, tmp_path, capsys):
    out = tmp_path / "hf"
    assert export_cmd("--load", str(trained / which), "--out", str(out), "--verify") == 0
    assert "OK" in capsys.readouterr().out
    meta = json.load(open(trained / which / "iter_0000002" / "meta.json"))
    assert meta["backend"] == which
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=meta["tokenizer_model"]).vocab_size()
    assert json.load(open(out / "config.json"))["vocab_size"] == vocab <= meta["model"]["padded_vocab_size"]


def test_bf16_export_verifies(trained, tmp_path):
    assert export_cmd("--load", str(trained / "deepspeed"), "--out", str(tmp_path / "hf"), "--dtype", "bf16",
                      "--verify") == 0
    from safetensors import safe_open

    shard = next((tmp_path / "hf").glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "hf"
    assert export_cmd("--load", str(trained / "megatron"), "--out", str(out)) == 0
    return out


def test_exported_dir_loads_with_auto_classes_and_generates(exported, trained):
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported)
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    sp = spm.SentencePieceProcessor(model_file=str(exported / "tokenizer.model"))
    texts = ["def main(args):\n    return 0\n", "  import os, sys  # 2024\n\n\tx = 'héllo ✓'", "a  b   c\n"]
    texts.append(open(os.path.join(os.path.dirname(os.__file__), "functools.py")).read()[:4000])
    for text in texts:  # the HF tokenizer reproduces sentencepiece exactly
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text[:40]
        assert tok.decode(sp.encode(text)) == text
    ids = tok("def ", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 8
    assert isinstance(tok.decode(gen[0]), str)


def test_imported_checkpoint_continues_training(exported, trained, tmp_path, cache):
    """export -> import-hf at TP=2 -> `train --load --no-load-optim` at TP=2 starts from it."""
    ck = tmp_path / "ck"
    assert import_cmd("--hf", str(exported), "--save", str(ck), "--tensor-model-parallel-size", "2") == 0
    meta = json.load(open(ck / "iter_0000000" / "meta.json"))
    assert meta["tokenizer_model"] == str(exported / "tokenizer.model")
    out = cli("train", *TINY, "--train-iters", "1", "--data-cache-path", cache,
              "--nproc-per-node", "2", "--tensor-model-parallel-size", "2", "--load", str(ck), "--no-load-optim",
              "--save", str(tmp_path / "cont"))
    assert "loaded checkpoint" in out.stdout + out.stderr
    assert (tmp_path / "cont" / "iter_0000001" / "meta.json").exists()


LM_EVAL_TASK = """task: tiny_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_hf_model_accepts_the_export(exported, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval accelerate)")
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (pip install accelerate)")
    data = tmp_path / "tiny.jsonl"
    with open(data, "w") as f:
        for q, choices, a in [("def f(x):\n    return", [" x", " y"], 0), ("import", [" os", " 12"], 0),
                              ("for i in", [" range(3):", " )"], 0)]:
            f.write(json.dumps({"question": q, "choices": choices, "answer": a}) + "\n")
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "tiny_local.yaml").write_text(LM_EVAL_TASK.format(data=data))
    env = {**ENV, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={exported},dtype=float32",
           "--tasks", "tiny_local", "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "1",
           "--output_path", str(tmp_path / "res")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "tiny_local" in out.stdout and "acc" in out.stdout


# ----------------------------------------------------------------------------
# refusals
# ----------------------------------------------------------------------------


def _settings(**kw):
    s = {"num_layers": 1, "hidden_size": 8, "ffn_hidden_size": 16, "num_attention_heads": 2, "num_query_groups": 2,
         "normalization": "RMSNorm", "swiglu": True, "position_embedding_type": "rope",
         "untie_embeddings_and_output_weights": False, "num_experts": None}
    s.update(kw)
    return s


@pytest.mark.parametrize("settings,extra,feature", [
    (_settings(normalization="LayerNorm"), {}, "LayerNorm"),
    (_settings(position_embedding_type="learned_absolute"), {}, "learned absolute positions"),
    (_settings(swiglu=False), {}, "SwiGLU"),
    (_settings(), {"decoder.layers.0.self_attention.linear_qkv.bias": torch.zeros(24)}, "biases"),
    (_settings(), {"decoder.layers.0.self_attention.q_layernorm.weight": torch.ones(4)}, "QK layer norm"),
    (_settings(), {"decoder.layers.0.self_attention.linear_proj.bias": torch.zeros(8)}, "biases"),
    (_settings(num_experts=2), {"decoder.layers.0.mlp.shared_experts.linear_fc1.weight": torch.zeros(4, 8)},
     "shared experts"),
    (_settings(add_qkv_bias=True, qk_layernorm=True), {}, "no supported HF architecture has both"),
    (_settings(add_qkv_bias=True, num_experts=2), {}, "no supported HF architecture has both"),
    (_settings(num_experts=2, moe_router_pre_softmax=True), {}, "Mixtral renormalises"),
])
def test_export_refuses_unsupported_architectures(settings, extra, feature):
    with pytest.raises(ConversionError, match=feature):
        megatron_to_hf({"embedding.word_embeddings.weight": torch.zeros(4, 8), **extra}, settings, 4)


def test_export_refuses_unknown_tensors():
    from megatron_simreg.conversion.layout import hf_to_megatron

    hf = _tiny_hf_state()
    sd = hf_to_megatron(hf, {**_settings(), "padded_vocab_size": 8})
    sd["decoder.layers.0.mlp.some_new_thing.weight"] = torch.zeros(2)
    with pytest.raises(ConversionError, match="does not know"):
        megatron_to_hf(sd, _settings(), 8)


def _tiny_hf_state():
    p = "model.layers.0."
    return {"model.embed_tokens.weight": torch.zeros(8, 8), "model.norm.weight": torch.ones(8),
            p + "input_layernorm.weight": torch.ones(8), p + "post_attention_layernorm.weight": torch.ones(8),
            p + "self_attn.q_proj.weight": torch.zeros(8, 8), p + "self_attn.k_proj.weight": torch.zeros(8, 8),
            p + "self_attn.v_proj.weight": torch.zeros(8, 8), p + "self_attn.o_proj.weight": torch.zeros(8, 8),
            p + "mlp.gate_proj.weight": torch.zeros(16, 8), p + "mlp.up_proj.weight": torch.zeros(16, 8),
            p + "mlp.down_proj.weight": torch.zeros(8, 16)}


def test_import_refuses_biases_and_rope_scaling(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, attention_bias=True,
                      rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    assert import_cmd("--hf", str(tmp_path / "hf"), "--save", str(tmp_path / "ck")) == 2
    err = capsys.readouterr().err
    assert "biases" in err and "rope scaling" in err
    assert not (tmp_path / "ck" / "latest_checkpointed_iteration.txt").exists()


@pytest.mark.parametrize("kind,extra,feature", [
    ("Qwen2Moe", {}, "shared experts"),
    ("Qwen3Moe", {"mlp_only_layers": [0]}, "dense layers between the MoE layers"),
    ("Qwen3", {"attention_bias": True}, "attention_bias=True"),
    ("Qwen2", {"use_sliding_window": True, "sliding_window": 16}, "sliding_window=16"),
    ("Mistral", {"sliding_window": 16}, "sliding_window=16"),
    ("Llama", {"rope_parameters": {**LLAMA3_ROPE, "original_max_position_embeddings": 4096}},
     "original_max_position_embeddings"),
    ("Llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn'"),
    ("Gemma", {}, "model_type 'gemma' is not supported"),
], ids=["qwen2_moe", "qwen3_moe-dense-layers", "qwen3-o-bias", "qwen2-window", "mistral-window", "llama3-context",
        "yarn", "gemma"])
def test_import_refuses_what_megatron_cannot_express_by_name(tmp_path, capsys, kind, extra, feature):
    """Refused from config.json alone, before any weight is read: exit 2, the feature named, nothing written."""
    import transformers

    cfg = getattr(transformers, f"{kind}Config")(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                                 max_position_embeddings=64, **extra)
    cfg.save_pretrained(tmp_path / "hf")
    assert import_cmd("--hf", str(tmp_path / "hf"), "--save", str(tmp_path / "ck")) == 2
    err = capsys.readouterr().err
    assert feature in err and "Traceback" not in err, err
    assert not (tmp_path / "ck").exists()


def test_missing_and_partial_checkpoints_give_clear_errors(tmp_path, capsys, trained):
    assert export_cmd("--load", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert export_cmd("--load", str(tmp_path / "empty"), "--out", str(tmp_path / "o")) == 2
    assert "latest_checkpointed_iteration.txt" in capsys.readouterr().err
    partial = tmp_path / "partial"
    shutil.copytree(trained / "deepspeed", partial)
    os.remove(partial / "iter_0000002" / "deepspeed" / "state" / "mp_rank_01_model_states.pt")
    assert export_cmd("--load", str(partial), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "mp_rank_01_model_states.pt is missing" in err and "partial" in err
    partial = tmp_path / "partial_megatron"
    shutil.copytree(trained / "megatron", partial)
    for f in (partial / "iter_0000002").glob("*.distcp"):
        f.write_bytes(b"")
    assert export_cmd("--load", str(partial), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "cannot read the Megatron checkpoint" in err and "iter_0000002" in err and len(err.splitlines()) == 1
