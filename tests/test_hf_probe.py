"""hf_probe (hooked states, final, logits; analyze; text packing) and the jump-strength command, tiny random models."""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_simreg import cli  # noqa: E402
from megatron_simreg.analysis import hf_probe  # noqa: E402
from megatron_simreg.analysis.hf_probe import (  # noqa: E402
    MARGIN_EDGES, ProbeError, analyze, decoder_layers, label_pair_counts, load_causal_lm, next_token_labels, probe,
    text_to_sequences)
from megatron_simreg.analysis.representations import classification_margins, label_cosine_similarity  # noqa: E402
from megatron_simreg.losses.jreg import jump_strength, layer_angular_distances  # noqa: E402

VOCAB, HIDDEN = 100, 32


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0))


def mixtral():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=64))


def embeddings(model, ids):
    """What the first decoder layer should receive: token (+ learned position) embeddings."""
    if isinstance(model, transformers.GPT2LMHeadModel):
        t = model.transformer
        return t.wte(ids) + t.wpe(torch.arange(ids.shape[1]))[None]
    return model.get_input_embeddings()(ids)


def final_norm_to_identity(model):
    """Drop the final norm so that h_L = the LM head input, whichever convention output_hidden_states follows."""
    if isinstance(model, transformers.GPT2LMHeadModel):
        model.transformer.ln_f = torch.nn.Identity()
    else:
        model.model.norm = torch.nn.Identity()
    return model


MODELS = {"llama": llama, "gpt2": gpt2, "mixtral": mixtral}


@pytest.fixture(params=sorted(MODELS))
def model(request):
    torch.manual_seed(0)
    return MODELS[request.param]().eval()


def ids_for(n=4, s=16, seed=1):
    return torch.randint(0, VOCAB, (n, s), generator=torch.Generator().manual_seed(seed))


def numbers(stats):
    keys = ["jump_strength", "intra_cos", "inter_cos", "margin_mean", "margin_median", "margin_frac_positive"]
    return stats["layer_distances"] + [stats[k] for k in keys]


# --------------------------------------------------------------------------- probe


def hook_ids(model):
    """Ids of every hook on the decoder layers and the LM head (transformers installs some of its own)."""
    modules = [*decoder_layers(model), model.get_output_embeddings()]
    return [(list(m._forward_hooks), list(m._forward_pre_hooks)) for m in modules]


def test_probe_states_final_logits(model):
    ids = ids_for()
    hooks_before = hook_ids(model)
    L = model.config.num_hidden_layers
    p = probe(model, ids)
    assert hook_ids(model) == hooks_before  # ours removed
    assert len(p.states) == L + 1
    assert all(s.shape == (4, 16, HIDDEN) for s in p.states) and p.final.shape == (4, 16, HIDDEN)
    assert p.logits.shape == (4, 16, VOCAB)
    with torch.no_grad():
        torch.testing.assert_close(p.states[0], embeddings(model, ids))
        hidden = model(ids, output_hidden_states=True).hidden_states
    # The intermediate states agree with output_hidden_states in every version (only the last entry varies).
    for l in range(L):
        torch.testing.assert_close(p.states[l], hidden[l])
    assert not torch.allclose(p.states[-1], p.final, atol=1e-3)  # h_L is before the final norm
    head = model.get_output_embeddings()
    logits = p.final @ head.weight.T + (head.bias if head.bias is not None else 0)
    torch.testing.assert_close(logits, p.logits, rtol=1e-5, atol=1e-5)


def test_probe_removes_hooks_on_error():
    torch.manual_seed(0)
    m = llama().eval()
    probe(m, ids_for(1, 4))  # lets transformers install its own hooks first
    hooks_before = hook_ids(m)
    with pytest.raises(IndexError):
        probe(m, torch.full((1, 4), VOCAB + 5))  # out-of-vocabulary id: the embedding raises mid-forward
    assert hook_ids(m) == hooks_before


def test_decoder_layers_found_and_clear_error():
    torch.manual_seed(0)
    m = mixtral()
    assert decoder_layers(m) is m.model.layers
    assert decoder_layers(gpt2()) is not None
    m.config.num_hidden_layers = 7
    with pytest.raises(ProbeError, match="no nn.ModuleList of 7 decoder layers"):
        decoder_layers(m)


# --------------------------------------------------------------------------- analyze


def test_analyze_matches_jreg_on_output_hidden_states(model):
    final_norm_to_identity(model)
    ids = ids_for()
    with torch.no_grad():
        states = list(model(ids, output_hidden_states=True).hidden_states)
    d = layer_angular_distances(states)
    stats = analyze(model, ids, batch_size=4)
    assert stats["layers"] == len(states) - 1 == len(stats["layer_distances"])
    assert stats["layer_distances"] == pytest.approx(d.tolist(), abs=1e-6)
    assert stats["jump_strength"] == pytest.approx(jump_strength(d).item(), rel=1e-5)
    assert stats["tokens"] == 64 and stats["labelled_tokens"] == 60 and stats["sequences"] == 4


def test_analyze_cosines_margins_pool_exactly():
    torch.manual_seed(0)
    m = llama().eval()
    ids = torch.randint(0, 5, (3, 12), generator=torch.Generator().manual_seed(2))  # 5 ids: many same-label pairs
    stats = analyze(m, ids, batch_size=3, include_margins=True)
    p, labels = probe(m, ids), next_token_labels(ids)
    # Brute force over all (sequence, i != j) pairs with valid labels, pooled across sequences.
    z = torch.nn.functional.normalize(p.final.double(), dim=-1)
    cos = z @ z.transpose(1, 2)
    valid = labels != -100
    pair = valid[:, :, None] & valid[:, None, :] & ~torch.eye(12, dtype=torch.bool)
    same = labels[:, :, None] == labels[:, None, :]
    assert stats["intra_cos"] == pytest.approx(cos[pair & same].mean().item(), abs=1e-6)
    assert stats["inter_cos"] == pytest.approx(cos[pair & ~same].mean().item(), abs=1e-6)
    assert label_pair_counts(labels[0]) == (int((pair & same)[0].sum()), int((pair & ~same)[0].sum()))
    # One sequence alone agrees with the existing per-batch function.
    one = analyze(m, ids[:1])
    assert (one["intra_cos"], one["inter_cos"]) == pytest.approx(label_cosine_similarity(p.final[:1], labels[:1]),
                                                                 abs=1e-6)
    margins = classification_margins(p.logits, labels)
    assert stats["margins"] == pytest.approx(margins.tolist(), abs=1e-5)
    assert stats["margin_mean"] == pytest.approx(margins.mean().item(), abs=1e-6)
    assert stats["margin_frac_positive"] == pytest.approx((margins > 0).double().mean().item())
    assert stats["margin_hist"]["edges"] == list(MARGIN_EDGES)
    assert len(stats["margin_hist"]["counts"]) == len(MARGIN_EDGES) + 1
    assert sum(stats["margin_hist"]["counts"]) == stats["labelled_tokens"] == 33
    json.dumps(stats)  # plain Python values


def test_margin_hist_bins():
    hist = hf_probe.margin_summary(torch.tensor([-30.0, -20.0, -0.5, 0.0, 0.5, 25.0]))["margin_hist"]["counts"]
    assert hist == [1, 1, 0, 0, 0, 1, 2, 0, 0, 0, 0, 1]


def test_analyze_batching_invariance(model):
    ids = ids_for()
    one_chunk = analyze(model, ids, batch_size=4)
    for other in (analyze(model, ids, batch_size=1), analyze(model, iter([ids[:3], ids[3:]]))):
        assert numbers(other) == pytest.approx(numbers(one_chunk), abs=1e-6)
        assert other["margin_hist"] == one_chunk["margin_hist"]
        assert (other["tokens"], other["labelled_tokens"]) == (one_chunk["tokens"], one_chunk["labelled_tokens"])


# --------------------------------------------------------------------------- text + loading


class CharTokenizer:
    def encode(self, text, add_special_tokens=True, verbose=True):
        return [ord(c) for c in text]


def test_text_to_sequences_packs_and_drops_tail():
    seqs = text_to_sequences("abcdefghij", CharTokenizer(), 3, max_sequences=None)
    assert seqs.dtype == torch.long and seqs.tolist() == [[97, 98, 99], [100, 101, 102], [103, 104, 105]]
    assert text_to_sequences("abcdefghij", CharTokenizer(), 3, max_sequences=2).shape == (2, 3)
    with pytest.raises(ProbeError, match=r"has 10 tokens.*--seq-length 16"):
        text_to_sequences("abcdefghij", CharTokenizer(), 16, 8)


def test_load_errors(tmp_path):
    with pytest.raises(ProbeError, match="model directory not found"):
        load_causal_lm(str(tmp_path / "nope"))
    with pytest.raises(ProbeError, match="no config.json"):
        load_causal_lm(str(tmp_path))
    transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ProbeError, match="no causal-LM class"):
        load_causal_lm(str(tmp_path))


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A saved tiny Llama with a sentencepiece tokenizer trained on the package's sample text."""
    from importlib import resources

    from megatron_simreg.conversion.hf_side import write_tokenizer
    from megatron_simreg.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("hf")
    text = root / "text.txt"
    text.write_text(resources.files("megatron_simreg.analysis").joinpath("data/sample_text.txt").read_text("utf-8"))
    sp_model = train_sentencepiece([str(text)], str(root / "sp"), 400)
    out = root / "model"
    vocab = write_tokenizer(sp_model, str(out))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(out)
    return out


def run_cli(capsys, *argv):
    rc = cli.main(["jump-strength", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_json_matches_analyze(hf_dir, capsys):
    rc, out, err = run_cli(capsys, "--hf", str(hf_dir), "--json", "--seq-length", "64", "--max-sequences", "4")
    assert rc == 0, err
    result = json.loads(out)
    assert result["text"] == "sample_text.txt (built-in)" and result["model"] == str(hf_dir)
    assert result["layers"] == 3 and result["tokens"] == 4 * 64 and result["sequences"] == 4
    model, tokenizer = load_causal_lm(str(hf_dir))
    text = (hf_dir.parent / "text.txt").read_text()
    expected = analyze(model, text_to_sequences(text, tokenizer, 64, 4))
    assert result["layer_distances"] == pytest.approx(expected["layer_distances"], abs=1e-6)
    assert result["jump_strength"] == pytest.approx(expected["jump_strength"], abs=1e-6)


def test_cli_table(hf_dir, capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick test sentence goes round and round. " * 20)
    rc, out, err = run_cli(capsys, "--hf", str(hf_dir), "--text-file", str(text), "--seq-length", "32")
    assert rc == 0, err
    assert f"text: {text}" in out and "<- final layer (jump)" in out and "jump strength J = " in out
    assert out.count("<- final layer") == 1 and "    3  " in out


def test_cli_errors(hf_dir, capsys, tmp_path):
    rc, _, err = run_cli(capsys, "--hf", str(tmp_path / "missing"))
    assert rc == 2 and "model directory not found" in err
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    rc, _, err = run_cli(capsys, "--hf", str(hf_dir), "--text-file", str(short), "--seq-length", "64")
    assert rc == 2 and "fewer than one sequence of --seq-length 64" in err and "text has " in err
    rc, _, err = run_cli(capsys, "--hf", str(hf_dir), "--seq-length", "4096")
    assert rc == 2 and "exceeds the model's 128 positions" in err
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(hf_dir / f, bare / f)
    rc, _, err = run_cli(capsys, "--hf", str(bare))
    assert rc == 2 and "has no tokenizer" in err
