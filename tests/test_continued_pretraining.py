"""Continued pretraining of an HF Llama (issue 16): import-hf records every model setting the trainer needs,
`train --load --use-checkpoint-args --no-load-optim` continues from it at a shorter --seq-length with the HF
model's loss, export-hf keeps rope_theta / rms_norm_eps, and bad inputs give one clear error line."""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
THETA, EPS, MAX_POS, STD = 100000.0, 1e-6, 128, 0.05


def _cmd(module, argv):
    import importlib

    mod = importlib.import_module(module)
    p = argparse.ArgumentParser()
    mod.add_arguments(p)
    return mod.main(p.parse_args(argv))


def run_cli(*argv, timeout=400):
    return subprocess.run([sys.executable, "-m", "megatron_simreg.cli", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def _llama(path, vocab=4096):
    """A tiny random Llama like the real ones: GQA, tied embeddings, rope_theta 1e5, rms_norm_eps 1e-6."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                      rms_norm_eps=EPS, rope_parameters={"rope_type": "default", "rope_theta": THETA},
                      tie_word_embeddings=True, initializer_range=STD)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # random norms too; large enough weights that rope_theta and eps matter
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() > 1 else 1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module")
def imported(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("cpt")
    (root / "cache").symlink_to(cache)  # the session's default corpus, prepared once
    _llama(root / "hf")
    out = run_cli("import-hf", "--hf", str(root / "hf"), "--save", str(root / "ck"))
    assert out.returncode == 0, out.stderr[-3000:]
    return root, out.stdout


def test_import_records_rope_theta_eps_and_positions_and_prints_the_train_flags(imported):
    root, stdout = imported
    model = json.load(open(root / "ck" / "iter_0000000" / "meta.json"))["model"]
    assert model["rotary_base"] == THETA and model["norm_epsilon"] == EPS
    assert model["max_position_embeddings"] == MAX_POS and model["init_method_std"] == STD
    assert "seq_length" not in model  # a training choice, not the model's: no longer max_position_embeddings
    line = next(ln for ln in stdout.splitlines() if "--rotary-base" in ln)
    for flag in ("--num-layers 2", "--hidden-size 32", "--ffn-hidden-size 48", "--num-attention-heads 4",
                 "--num-query-groups 2", "--swiglu", "--rotary-base 100000", "--norm-epsilon 1e-06",
                 "--max-position-embeddings 128", "--init-method-std 0.05"):
        assert flag in line, (flag, line)
    assert "--untie-embeddings-and-output-weights" not in line
    assert "--use-checkpoint-args" in stdout


def test_refusal_names_the_flags_to_pass(imported, tmp_path):
    """Without --use-checkpoint-args, a mismatch says which flags to pass, not just 'use the checkpoint's settings'."""
    root, _ = imported
    out = run_cli("train", "--load", str(root / "ck"), "--no-load-optim", "--num-layers", "2", "--hidden-size", "32",
                  "--ffn-hidden-size", "48", "--num-query-groups", "2", "--swiglu", "--seq-length", "32",
                  "--train-iters", "1", "--data-cache-path", str(root / "cache"))
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "--rotary-base 100000" in out.stderr and "--norm-epsilon 1e-06" in out.stderr
    assert "--max-position-embeddings 128" in out.stderr and "--use-checkpoint-args" in out.stderr


def _train_flags(root, *extra):
    return ["--load", str(root / "ck"), "--use-checkpoint-args", "--no-load-optim", "--lr", "0", "--min-lr", "0",
            "--lr-warmup-iters", "0", "--train-iters", "2", "--seq-length", "32", "--micro-batch-size", "2",
            "--data-cache-path", str(root / "cache"), *extra]


@pytest.fixture(scope="module")
def continued(imported):
    root, _ = imported
    # --num-layers 4 is overridden by the checkpoint's 2, as Megatron-LM's --use-checkpoint-args does
    out = run_cli("train", *_train_flags(root, "--num-layers", "4", "--save", str(root / "cont")))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return root, out.stdout + out.stderr


def test_continued_pretraining_matches_the_hf_models_loss(continued):
    root, log = continued
    assert "--use-checkpoint-args" in log and "--rotary-base 100000" in log and "--num-layers 2" in log
    assert "loaded checkpoint" in log
    records = [json.loads(ln) for ln in open(root / "cont" / "metrics.jsonl")]
    first = records[0]
    assert first["iteration"] == 1 and math.isfinite(first["lm_loss"])
    # the HF model's loss on the trainer's first batch (the same tokens, labels and mask), fp32
    code = ("import sys, json; from tools.gpu_acceptance import _hf_losses; "
            "print(json.dumps(_hf_losses(sys.argv[1:], 1)))")
    out = subprocess.run([sys.executable, "-c", code, str(root / "hf"), *_train_flags(root)], cwd=ROOT,
                         capture_output=True, text=True, env=ENV, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    want = json.loads(out.stdout.strip().splitlines()[-1])[0]
    assert abs(first["lm_loss"] - want) < 1e-4, (first["lm_loss"], want)
    meta = json.load(open(root / "cont" / "iter_0000002" / "meta.json"))
    assert meta["model"]["rotary_base"] == THETA and meta["model"]["seq_length"] == 32


def test_export_after_continued_pretraining_keeps_rope_theta_and_eps(continued):
    root, _ = continued
    out = run_cli("export-hf", "--load", str(root / "cont"), "--out", str(root / "out"))
    assert out.returncode == 0, out.stderr[-3000:]
    from transformers import AutoConfig

    src, got = AutoConfig.from_pretrained(root / "hf"), AutoConfig.from_pretrained(root / "out")
    assert got.rope_parameters["rope_theta"] == src.rope_parameters["rope_theta"] == THETA
    assert got.rms_norm_eps == src.rms_norm_eps == EPS
    assert got.max_position_embeddings == src.max_position_embeddings == MAX_POS
    assert got.initializer_range == STD


# ----------------------------------------------------------------------------
# a Qwen3 with its own HF tokenizer: preprocess -> import -> continue -> export
# ----------------------------------------------------------------------------

DOCS = [f"def function_{i}(x):\n    return x * {i} + {i % 7}  # the {i}th line of code" for i in range(200)]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A tiny Qwen3 (QK-norm, head_dim 16 with hidden 32, rope_theta 1e6, untied) whose directory holds a 290-token
    ByteLevel BPE tokenizer (eos 0, bos 1, pad 2) and a vocab_size of 300, as real models pad theirs; the data is
    preprocessed with that tokenizer; the model is imported and trained 2 iterations at lr 0."""
    from test_export_tokenizer import _tokenizer
    from test_hf_tokenizer import _tool
    from transformers import Qwen3Config, Qwen3ForCausalLM

    root = tmp_path_factory.mktemp("qwen")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=MAX_POS, rms_norm_eps=EPS,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=0, pad_token_id=2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() > 1 else 1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(root / "hf")
    _tokenizer(root / "hf", docs=DOCS)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    assert _tool("preprocess_data")(["--input", str(root / "docs.jsonl"), "--output-prefix", str(root / "docs"),
                                     "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                                     str(root / "hf"), "--append-eod"]) == 0
    out = run_cli("import-hf", "--hf", str(root / "hf"), "--save", str(root / "ck"), "--tensor-model-parallel-size",
                  "2")
    assert out.returncode == 0, out.stderr[-3000:]
    train = ["--load", str(root / "ck"), "--use-checkpoint-args", "--no-load-optim", "--lr", "0", "--min-lr", "0",
             "--train-iters", "2", "--seq-length", "32", "--micro-batch-size", "2", "--split", "90,10,0",
             "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(root / "hf"),
             "--data-path", str(root / "docs_text_document"), "--data-cache-path", str(root / "cache")]
    out = run_cli("train", *train, "--save", str(root / "cont"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return root, model.eval(), train


@pytest.fixture(scope="module")
def hf_losses(qwen):
    """The HF model's losses on the 2 batches the continued runs train on (data-parallel size 1 in each)."""
    root, _, train = qwen
    code = ("import sys, json; from tools.gpu_acceptance import _hf_losses; "
            "print(json.dumps(_hf_losses(sys.argv[1:], 2)))")
    out = subprocess.run([sys.executable, "-c", code, str(root / "hf"), *train], cwd=ROOT, capture_output=True,
                         text=True, env=ENV, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_hf_loss(save, want):
    """Each logged loss at lr 0 is the HF model's on the same tokens. 1e-4: fp32 on both sides, the same math in
    another order (fused QKV, RoPE tables, softmax), a few ulp per op; measured ~1e-6."""
    got = [json.loads(ln)["lm_loss"] for ln in open(save / "metrics.jsonl")]
    assert len(got) == 2 and all(abs(g - w) < 1e-4 for g, w in zip(got, want, strict=True)), (got, want)


def test_continued_qwen3_with_its_hf_tokenizer_has_the_hf_models_loss(qwen, hf_losses):
    root, _, train = qwen
    _assert_hf_loss(root / "cont", hf_losses)
    meta = json.load(open(root / "cont" / "iter_0000002" / "meta.json"))
    assert meta["model"]["qk_layernorm"] and meta["model"]["kv_channels"] == 16
    assert meta["tokenizer_type"] == "HuggingFaceTokenizer" and meta["hf_vocab_size"] == 300


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                    ["--pipeline-model-parallel-size", "2"]], ids=["tp2-sp", "pp2"])
def test_an_import_trains_at_tp2_and_pp2_with_the_hf_models_loss(qwen, hf_losses, tmp_path, layout):
    """The Megatron forward of an import at another layout (dist_checkpointing reshards the TP=2 import), not only
    HF against HF: QK-norm, the vocabulary rows and the untied output layer all go through TP or PP here."""
    _, _, train = qwen
    out = run_cli("train", *train, "--nproc-per-node", "2", *layout, "--save", str(tmp_path / "cont"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    _assert_hf_loss(tmp_path / "cont", hf_losses)


def test_export_after_continued_pretraining_gives_the_source_vocabulary_and_tokenizer(qwen):
    """AutoModelForCausalLM / AutoTokenizer load the export; its vocabulary is the source's 300 rows (10 past the
    tokenizer), its tokenizer gives the source's ids, and (lr 0) its logits are the source's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, src, _ = qwen
    out = run_cli("export-hf", "--load", str(root / "cont"), "--out", str(root / "out"), "--verify")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    back = AutoModelForCausalLM.from_pretrained(root / "out").eval()
    assert type(back).__name__ == "Qwen3ForCausalLM" and back.config.vocab_size == src.config.vocab_size == 300
    assert (back.config.bos_token_id, back.config.eos_token_id, back.config.pad_token_id) == (1, 0, 2)
    a, b = AutoTokenizer.from_pretrained(root / "hf"), AutoTokenizer.from_pretrained(root / "out")
    assert len(a) == len(b) == 290
    for text in DOCS[:5] + ["h\u00e9llo \u2713"]:
        assert a(text)["input_ids"] == b(text)["input_ids"]
    x = torch.tensor([a(DOCS[7])["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(src(x).logits, back(x).logits, atol=1e-5)


# ----------------------------------------------------------------------------
# bad inputs: exit 2, one error line, no traceback
# ----------------------------------------------------------------------------


def _bad_hf(tmp_path, kind):
    """A broken HF directory of ``kind``; returns its path."""
    path = tmp_path / "hf"
    if kind == "missing":
        return tmp_path / "nowhere"
    model = _llama(path, vocab=64) if kind != "shard" else None
    if kind == "truncated":
        f = path / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif kind == "garbage":
        (path / "model.safetensors").write_bytes(b"this is not a safetensors file")
    elif kind == "no_weights":
        os.remove(path / "model.safetensors")
    elif kind == "shard":
        model = _llama(tmp_path / "whole", vocab=64)
        model.save_pretrained(path, max_shard_size="20KB")
        index = json.load(open(path / "model.safetensors.index.json"))
        os.remove(path / sorted(set(index["weight_map"].values()))[-1])
    return path


BAD = ["truncated", "garbage", "no_weights", "shard", "missing"]
WHAT = {"truncated": "model.safetensors", "garbage": "model.safetensors", "no_weights": "weights",
        "shard": "model.safetensors.index.json", "missing": "does not exist"}


@pytest.mark.parametrize("kind", BAD)
def test_import_hf_bad_input_is_one_clear_error(tmp_path, capsys, kind):
    hf = _bad_hf(tmp_path, kind)
    capsys.readouterr()
    assert _cmd("megatron_simreg.commands.import_hf", ["--hf", str(hf), "--save", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("import-hf: error:") and len(err.splitlines()) == 1 and WHAT[kind] in err, err
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("kind", BAD)
def test_jump_strength_bad_input_is_one_clear_error(tmp_path, capsys, kind):
    hf = _bad_hf(tmp_path, kind)
    capsys.readouterr()
    assert _cmd("megatron_simreg.commands.jump_strength", ["--hf", str(hf), "--seq-length", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jump-strength: error:") and len(err.splitlines()) == 1 and WHAT[kind] in err, err


def test_import_hf_refuses_tensor_parallel_size_zero(tmp_path, capsys):
    _llama(tmp_path / "hf", vocab=64)
    capsys.readouterr()
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--make-vocab-size-divisible-by"):
        assert _cmd("megatron_simreg.commands.import_hf",
                    ["--hf", str(tmp_path / "hf"), "--save", str(tmp_path / "ck"), flag, "0"]) == 2
        err = capsys.readouterr().err
        assert err == f"import-hf: error: {flag} must be >= 1, got 0\n", err


def test_train_validates_the_new_model_flags(capsys):
    from megatron_simreg.training.args import parse_train_args

    a = parse_train_args(["--seq-length", "64"])
    assert (a.rotary_base, a.norm_epsilon, a.init_method_std, a.max_position_embeddings) == (10000.0, 1e-5, 0.02, 64)
    for argv, msg in [(["--rotary-base", "0"], "--rotary-base"), (["--norm-epsilon", "-1"], "--norm-epsilon"),
                      (["--position-embedding-type", "learned_absolute", "--seq-length", "64",
                        "--max-position-embeddings", "32"], "--max-position-embeddings"),
                      (["--use-checkpoint-args"], "--load"),
                      (["--hidden-size", "30", "--num-attention-heads", "4"], "--kv-channels"),
                      (["--kv-channels", "0"], "--kv-channels"),
                      (["--moe-ffn-hidden-size", "16"], "--num-experts"),
                      (["--moe-router-pre-softmax"], "--num-experts"),
                      (["--use-rope-scaling", "--rope-scaling-factor", "0"], "--rope-scaling-factor")]:
        capsys.readouterr()
        with pytest.raises(SystemExit):
            parse_train_args(argv)
        assert msg in capsys.readouterr().err


def test_old_checkpoints_compare_as_their_defaults_and_seq_length_may_change():
    """A meta.json written before rotary_base/norm_epsilon/max_position_embeddings were recorded (import-hf's old
    layernorm_epsilon key included) resumes with the values it was trained with; seq_length is free."""
    from megatron_simreg.training.checkpoint import CheckpointError, check_compatible

    old = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 48, "num_attention_heads": 4, "num_query_groups": 2,
           "seq_length": 64, "normalization": "RMSNorm", "swiglu": True, "untie_embeddings_and_output_weights": False,
           "position_embedding_type": "rope", "num_experts": None, "moe_router_topk": 2, "padded_vocab_size": 4096}
    run = {**old, "seq_length": 32, "rotary_base": 10000.0, "norm_epsilon": 1e-5, "max_position_embeddings": 64,
           "init_method_std": 0.02}
    check_compatible(old, run, "old")
    check_compatible({**old, "layernorm_epsilon": 1e-6}, {**run, "norm_epsilon": 1e-6}, "old import")
    with pytest.raises(CheckpointError) as e:
        check_compatible({**old, "rotary_base": 5e5}, run, "ck")
    assert "rotary_base: checkpoint=500000.0 run=10000.0" in str(e.value)
    assert "--rotary-base 500000" in str(e.value) and "--use-checkpoint-args" in str(e.value)
