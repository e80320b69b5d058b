"""export-hf gives back what went in (issue 16): the run's tokenizer files and special ids, the checkpoint's real
vocabulary, refusals for an export that would drop embedding rows, and --verify comparing the tokenizers.

Checkpoints come from an in-process import-hf of a tiny Llama (vocab 300, padded 384); a "trained run" is that
checkpoint with the run's meta.json fields (tokenizer_type / tokenizer_model) in place of the import's."""

import json
import os
import shutil

from test_conversion import _tiny_hf, export_cmd, import_cmd

CODE = [f"def function_{i}(x):\n    return x * {i} + {i % 7}  # the {i}th line of code" for i in range(100)]
PROSE = [f"The quick brown fox number {i} jumps over the lazy dog; h\u00e9llo {i * 3}." for i in range(100)]
SAMPLES = ["def main(args):\n    return 0\n", "  import os, sys  # 2024\n", "h\u00e9llo \u2713 a  b"]


def _tokenizer(path, docs=CODE, vocab=290, extra=0):
    """A ByteLevel BPE tokenizer: eos ``</s>`` 0, bos ``<s>`` 1, pad ``<pad>`` 2 (not the 1/2/None defaults)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["</s>", "<s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if extra:
        fast.add_tokens([f"<extra_{i}>" for i in range(extra)])
    fast.save_pretrained(str(path))
    return fast


def _run_checkpoint(tmp_path, tok_dir):
    """An import-hf checkpoint turned into a training run's: meta records the run's HF tokenizer."""
    _tiny_hf("llama", tmp_path / "hf")
    ck = tmp_path / "ck"
    assert import_cmd("--hf", str(tmp_path / "hf"), "--save", str(ck), "--make-vocab-size-divisible-by", "128") == 0
    meta_path = ck / "iter_0000000" / "meta.json"
    meta = json.load(open(meta_path))
    for key in ("imported_from", "hf_vocab_size"):
        meta.pop(key)
    meta.update(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tok_dir))
    json.dump(meta, open(meta_path, "w"))
    return ck


def test_export_of_a_hf_tokenizer_run_carries_its_tokenizer_ids_and_vocab(tmp_path):
    from transformers import AutoTokenizer

    src = _tokenizer(tmp_path / "tok")
    ck = _run_checkpoint(tmp_path, tmp_path / "tok")
    assert export_cmd("--load", str(ck), "--out", str(tmp_path / "out"), "--verify") == 0
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 0, 2)
    assert cfg["vocab_size"] == len(src) and cfg["tie_word_embeddings"] is False  # as the checkpoint (untied)
    gen = json.load(open(tmp_path / "out" / "generation_config.json"))
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 0, 2)
    auto = AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)
    for text in SAMPLES:
        assert auto(text)["input_ids"] == src(text)["input_ids"]


def test_export_of_a_sentencepiece_run_carries_its_pad_id(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(CODE + PROSE), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=330, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", add_dummy_prefix=False,
                                   remove_extra_whitespaces=False, unk_id=3, bos_id=0, eos_id=1, pad_id=2,
                                   minloglevel=2)
    ck = _run_checkpoint(tmp_path, tmp_path / "sp.model")
    meta_path = ck / "iter_0000000" / "meta.json"
    json.dump({**json.load(open(meta_path)), "tokenizer_type": "SentencePieceTokenizer"}, open(meta_path, "w"))
    assert export_cmd("--load", str(ck), "--out", str(tmp_path / "out"), "--verify") == 0
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"], cfg["vocab_size"]) == (0, 1, 2, 330)


def test_export_of_an_imported_model_copies_its_tokenizer_through(tmp_path):
    """import-hf records the source directory's HF tokenizer; export-hf gives back its files, ids and vocab."""
    from transformers import AutoTokenizer

    _tiny_hf("llama", tmp_path / "hf")
    src = _tokenizer(tmp_path / "hf")  # next to the model, as save_pretrained puts it
    assert import_cmd("--hf", str(tmp_path / "hf"), "--save", str(tmp_path / "ck")) == 0
    meta = json.load(open(tmp_path / "ck" / "iter_0000000" / "meta.json"))
    assert meta["tokenizer_type"] == "HuggingFaceTokenizer" and meta["tokenizer_model"] == str(tmp_path / "hf")
    assert export_cmd("--load", str(tmp_path / "ck"), "--out", str(tmp_path / "out"), "--verify") == 0
    auto = AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)
    assert [auto(t)["input_ids"] for t in SAMPLES] == [src(t)["input_ids"] for t in SAMPLES]
    got, want = (json.load(open(tmp_path / d / "config.json")) for d in ("out", "hf"))
    for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        assert got.get(key) == want.get(key), key


def test_export_refuses_to_drop_embedding_rows(tmp_path, capsys):
    # a run's tokenizer larger than the checkpoint's padded vocabulary (384)
    _tokenizer(tmp_path / "big", extra=400 - 290)
    ck = _run_checkpoint(tmp_path, tmp_path / "big")
    assert export_cmd("--load", str(ck), "--out", str(tmp_path / "out")) == 2
    assert "400 tokens but the model only 384 rows" in capsys.readouterr().err
    # an imported model (HF vocab_size 300) exported with a 350-token tokenizer: vocab_size would be too small
    _tokenizer(tmp_path / "mid", extra=350 - 290)
    assert import_cmd("--hf", str(tmp_path / "hf"), "--save", str(tmp_path / "imp"),
                      "--make-vocab-size-divisible-by", "128") == 0
    assert export_cmd("--load", str(tmp_path / "imp"), "--out", str(tmp_path / "out"), "--tokenizer-model",
                      str(tmp_path / "mid")) == 2
    assert "vocab_size would be 300" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_verify_fails_when_the_exported_tokenizer_differs(tmp_path, monkeypatch, capsys):
    from megatron_simreg.conversion import export

    _tokenizer(tmp_path / "tok")
    _tokenizer(tmp_path / "other", docs=PROSE)  # same size, other merges
    ck = _run_checkpoint(tmp_path, tmp_path / "tok")

    def copy_other(src_dir, out):
        for name in os.listdir(tmp_path / "other"):
            shutil.copyfile(tmp_path / "other" / name, os.path.join(out, name))

    monkeypatch.setattr(export, "copy_hf_tokenizer", copy_other, raising=False)
    assert export_cmd("--load", str(ck), "--out", str(tmp_path / "out"), "--verify") == 1
    out = capsys.readouterr().out
    assert "tokenizer: the exported tokenizer encodes" in out and "nothing was written" in out
    assert not (tmp_path / "out").exists()
