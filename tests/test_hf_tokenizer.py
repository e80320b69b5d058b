"""Hugging Face tokenizers (``--tokenizer-type HuggingFaceTokenizer``, Megatron-LM's flag): preprocessing, training,
the dataset's token range against the tokenizer, what the checkpoint records, and the errors for wrong paths.

The tokenizer is trained here (ByteLevel BPE, ~400 tokens) so nothing is downloaded.
"""

import json
import os
import shutil

import pytest

from trainer_utils import ROOT, train

DOCS = [f"def function_{i}(x):\n    return x * {i} + {i % 7}  # the {i}th line of code" for i in range(300)]


def _tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _make_hf_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(DOCS[:50], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny HF tokenizer directory, a JSONL of ``DOCS`` and its preprocessed prefix (``--append-eod``)."""
    root = tmp_path_factory.mktemp("hf")
    tok_dir = _make_hf_tokenizer(root / "tok")
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    assert _tool("preprocess_data")(["--input", str(jsonl), "--output-prefix", str(root / "docs"),
                                     "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok_dir,
                                     "--append-eod"]) == 0
    return {"root": root, "tok": tok_dir, "jsonl": str(jsonl), "prefix": str(root / "docs_text_document")}


def test_preprocess_ids_are_autotokenizers_and_train_runs(hf, cache):
    """The .bin holds AutoTokenizer's ids (no special tokens added) + eos as EOD; train runs 2 iterations on it and
    its checkpoint records the tokenizer type."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(hf["tok"], local_files_only=True)
    ds = IndexedDataset(hf["prefix"])
    assert len(ds) == len(DOCS)
    for i in (0, 1, 150, 299):
        expected = auto(DOCS[i], add_special_tokens=False)["input_ids"] + [auto.eos_token_id]
        assert ds[i].tolist() == expected
    save = str(hf["root"] / "run")
    train("--train-iters", "2", "--data-path", hf["prefix"], "--tokenizer-type", "HuggingFaceTokenizer",
          "--tokenizer-model", hf["tok"], "--split", "90,10,0", "--save", save, cache=cache)
    meta = json.load(open(os.path.join(save, "iter_0000002", "meta.json")))
    assert meta["tokenizer_type"] == "HuggingFaceTokenizer" and meta["tokenizer_model"] == os.path.abspath(hf["tok"])
    assert meta["data"]["tokenizer_type"] == "HuggingFaceTokenizer" and meta["data"]["tokenizer_sha256"]


def test_the_default_corpus_is_tokenized_with_a_given_hf_tokenizer(hf, tmp_path):
    """Without --data-path, --tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR tokenizes the default corpus
    with that tokenizer (AutoTokenizer's ids, eos as EOD) instead of training a sentencepiece model."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    from megatron_simreg.data.default_corpus import prepare_default_corpus, stdlib_documents

    cache = str(tmp_path / "cache")
    save = str(tmp_path / "run")
    train("--train-iters", "2", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf["tok"],
          "--save", save, cache=cache)
    meta = json.load(open(os.path.join(save, "iter_0000002", "meta.json")))
    assert meta["tokenizer_type"] == "HuggingFaceTokenizer" and meta["model"]["padded_vocab_size"] < 4096  # not 4096
    prefix, model = prepare_default_corpus(cache, tokenizer_type="HuggingFaceTokenizer", tokenizer_model=hf["tok"])
    assert model == os.path.abspath(hf["tok"]) and not os.path.exists(os.path.join(os.path.dirname(prefix),
                                                                                   "tokenizer.model"))
    auto = AutoTokenizer.from_pretrained(hf["tok"], local_files_only=True)
    first = stdlib_documents()[0][1]
    want = auto(first, add_special_tokens=False)["input_ids"] + [auto.eos_token_id]
    ds = IndexedDataset(prefix)  # kept alive: its samples are views of its memory map
    assert ds[0].tolist() == want


def test_resume_with_another_tokenizer_is_refused(hf, cache):
    """A tokenizer directory with other content (here its tokenizer_config.json) is another tokenizer: resuming
    is refused, naming --tokenizer-model."""
    save = str(hf["root"] / "run")
    if not os.path.isdir(os.path.join(save, "iter_0000002")):
        pytest.skip("needs the checkpoint of test_preprocess_ids_are_autotokenizers_and_train_runs")
    other = shutil.copytree(hf["tok"], hf["root"] / "tok_other")
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    out = train("--train-iters", "3", "--load", save, "--data-path", hf["prefix"], "--tokenizer-type",
                "HuggingFaceTokenizer", "--tokenizer-model", str(other), "--split", "90,10,0", cache=cache,
                expect_ok=False)
    assert out.returncode == 2 and "--tokenizer-model: checkpoint=" in out.stderr \
        and "--allow-changed-on-resume tokenizer-model" in out.stderr, out.stderr[-2000:]


def test_data_settings_record_the_type_and_hash_the_directory(hf, tmp_path):
    """data_settings holds the tokenizer type; the hash covers an HF directory's tokenizer files; a checkpoint
    without the type (written before it was recorded) reads as SentencePieceTokenizer."""
    import argparse

    from megatron_simreg.training.resume_checks import check_data, data_settings

    args = argparse.Namespace(seed=1, data_path=["x"], split="1,0,0", simreg_weight=0.0, simreg_temperature=0.1,
                              simreg_scope="sequence", jreg_weight=0.0, tokenizer_type="HuggingFaceTokenizer",
                              mock_data=False, eod_mask_loss=False, reset_position_ids=False,
                              reset_attention_mask=False)
    a = data_settings(args, 4, hf["tok"])
    assert a["tokenizer_type"] == "HuggingFaceTokenizer" and len(a["tokenizer_sha256"]) == 64
    copy = shutil.copytree(hf["tok"], tmp_path / "copy")
    assert data_settings(args, 4, str(copy))["tokenizer_sha256"] == a["tokenizer_sha256"]
    with open(copy / "tokenizer_config.json", "a") as f:
        f.write("\n")
    assert data_settings(args, 4, str(copy))["tokenizer_sha256"] != a["tokenizer_sha256"]
    sp = {**a, "tokenizer_type": "SentencePieceTokenizer"}
    with pytest.raises(ValueError, match="--tokenizer-type: checkpoint='SentencePieceTokenizer' "
                                         "run='HuggingFaceTokenizer'"):
        check_data(sp, a, [], "from here")
    old = {k: v for k, v in sp.items() if k != "tokenizer_type"}
    check_data(old, sp, [], "from here")  # an older checkpoint: no tokenizer_type key, sentencepiece


def test_data_from_a_bigger_tokenizer_is_refused_at_start(hf, cache):
    """The default corpus (sentencepiece, 4096 tokens) read with the ~400-token HF tokenizer: exit 2 before
    training, naming the prefix, the max id, the tokenizer and its size."""
    from transformers import AutoTokenizer

    from megatron_simreg.data.default_corpus import prepare_default_corpus

    prefix, _ = prepare_default_corpus(cache)
    out = train("--train-iters", "2", "--data-path", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
                "--tokenizer-model", hf["tok"], cache=cache, expect_ok=False)
    assert out.returncode == 2, out.stderr[-2000:]
    size = len(AutoTokenizer.from_pretrained(hf["tok"], local_files_only=True))
    assert f"dataset {prefix!r} holds token id" in out.stderr and f"has only {size} tokens" in out.stderr \
        and "tools/preprocess_data.py" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "iteration" not in out.stdout, out.stdout[-2000:]


def test_hf_tokenizer_without_the_type_and_bad_hf_paths(hf, tmp_path, capsys):
    """An HF directory or tokenizer.json passed as a sentencepiece model, an HF path without tokenizer files and a
    corrupt tokenizer.json: exit 2 with one message naming the path and the fix, for train and preprocess_data.py."""
    from megatron_simreg.training.args import parse_train_args

    preprocess = _tool("preprocess_data")
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = shutil.copytree(hf["tok"], tmp_path / "corrupt")
    (corrupt / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    cases = [
        ([hf["tok"]], "looks like a Hugging Face tokenizer; pass --tokenizer-type HuggingFaceTokenizer"),
        ([os.path.join(hf["tok"], "tokenizer.json")], "pass --tokenizer-type HuggingFaceTokenizer"),
        (["--tokenizer-type", "HuggingFaceTokenizer", str(empty)], "no Hugging Face tokenizer files"),
        (["--tokenizer-type", "HuggingFaceTokenizer", str(corrupt)], "tokenizer.json"),
    ]
    for flags, message in cases:
        *type_flags, model = flags
        with pytest.raises(SystemExit) as e:
            parse_train_args(["--data-path", hf["prefix"], *type_flags, "--tokenizer-model", model])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and model in err, err
        with pytest.raises(SystemExit) as e:
            preprocess(["--input", hf["jsonl"], "--output-prefix", str(tmp_path / "x"), *type_flags,
                        "--tokenizer-model", model])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and model in err, err
        assert not os.path.exists(tmp_path / "x_text_document.bin")
    # the whole trainer, once: exit 2 and the hint, no traceback
    out = train("--train-iters", "2", "--data-path", hf["prefix"], "--tokenizer-model", hf["tok"],
                cache=str(tmp_path / "cache"), expect_ok=False, timeout=200)
    assert out.returncode == 2 and "--tokenizer-type HuggingFaceTokenizer" in out.stderr \
        and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_sentencepiece_data_from_a_bigger_vocabulary_is_refused_at_start(cache):
    """Data tokenized with the 8192-token sentencepiece model, trained with the 4096-token one: exit 2 with the
    message (before this check the run either trained on ids the tokenizer does not have or crashed in the
    embedding)."""
    from megatron_simreg.data.default_corpus import prepare_default_corpus

    _, small = prepare_default_corpus(cache)
    prefix, _ = prepare_default_corpus(cache, vocab_size=8192)
    out = train("--train-iters", "2", "--data-path", prefix, "--tokenizer-model", small, cache=cache,
                expect_ok=False)
    assert out.returncode == 2 and f"dataset {prefix!r} holds token id" in out.stderr \
        and "has only 4096 tokens" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
