"""The data layer: tokenizer, JSONL -> indexed dataset, Megatron GPT datasets, default corpus, errors.

One small corpus (stdlib source plus a few unicode documents, ~120 KB) with a 512-token tokenizer is built
once per module; every test reads it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch

pytest.importorskip("sentencepiece")
import megatron.core  # noqa: E402,F401  (a hard import: a broken install must fail, not skip)

import megatron_simreg.data.default_corpus as default_corpus  # noqa: E402
from megatron_simreg.data import (  # noqa: E402
    Tokenizer,
    build_gpt_datasets,
    check_vocab_fits,
    ensure_dataset_helpers,
    prepare_default_corpus,
    preprocess_jsonl,
    stdlib_documents,
    train_sentencepiece,
)

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 512
SEQ = 64
UNICODE_DOCS = [
    "héllo wörld — ünïcödé\n\ttab\n    indent  two  spaces\n",
    "emoji 🙂🚀 and 中文 and \x00 nul",
    "",
]


def _write_jsonl(path, texts, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({key: text, "other": "x"}) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two JSONL files (A: stdlib source, B: the same lines reversed), a tokenizer and their datasets."""
    d = tmp_path_factory.mktemp("data")
    docs_a = [text for _, text in stdlib_documents(max_bytes=60_000)] + UNICODE_DOCS
    docs_b = ["\n".join(reversed(text.split("\n"))) for _, text in stdlib_documents(max_bytes=60_000)]
    _write_jsonl(d / "a.jsonl", docs_a)
    _write_jsonl(d / "b.jsonl", docs_b)
    model = train_sentencepiece([str(d / "a.jsonl"), str(d / "b.jsonl")], str(d / "tok"), VOCAB)
    tok = Tokenizer(model)
    prefix_a = preprocess_jsonl(str(d / "a.jsonl"), str(d / "a"), model, append_eod=True)["text"]
    prefix_b = preprocess_jsonl(str(d / "b.jsonl"), str(d / "b"), model, append_eod=True)["text"]
    return dict(dir=d, docs_a=docs_a, docs_b=docs_b, model=model, tok=tok, a=prefix_a, b=prefix_b)


def _pieces(model):
    t = Tokenizer(model)
    return [(t._sp.id_to_piece(i), t._sp.get_score(i)) for i in range(t.vocab_size)]


# --------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_deterministic_and_round_trips(corpus):
    d = corpus["dir"]
    again = train_sentencepiece([str(d / "a.jsonl"), str(d / "b.jsonl")], str(d / "tok_again"), VOCAB)
    assert _pieces(again) == _pieces(corpus["model"])  # same pieces, ids and scores
    tok = corpus["tok"]
    assert tok.vocab_size == VOCAB and tok.eod == 2 and tok.pad == -1
    for text in [*UNICODE_DOCS, corpus["docs_a"][0], "    return {'a': 1}\r\n\n\n"]:
        ids = tok.tokenize(text)
        assert tok.detokenize(ids) == text
        assert 0 not in ids  # byte fallback: never <unk>
        assert all(0 <= i < tok.vocab_size for i in ids)


def test_tokenizer_trains_on_plain_text(tmp_path):
    (tmp_path / "t.txt").write_text("plain text file\n" * 50 + "".join(chr(c) for c in range(97, 123)))
    tok = Tokenizer(train_sentencepiece([str(tmp_path / "t.txt")], str(tmp_path / "m"), 300))
    assert tok.vocab_size == 300 and tok.detokenize(tok.tokenize("plain text")) == "plain text"


# -------------------------------------------------------------------------------------------- preprocess


def test_preprocess_writes_indexed_dataset_of_tokenizer_ids(corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok, docs = corpus["tok"], corpus["docs_a"]
    ds = IndexedDataset(corpus["a"])
    assert corpus["a"].endswith("a_text_document")
    assert len(ds.document_indices) - 1 == len(docs)  # one document per line, the empty one included
    assert ds.sequence_lengths.sum() == sum(len(tok.tokenize(t)) + 1 for t in docs)
    assert ds.index.dtype == numpy.uint16  # Megatron-LM's choice below 65500 tokens
    for i, text in enumerate(docs):
        seqs = ds.document_indices[i], ds.document_indices[i + 1]
        got = numpy.concatenate([ds[j] for j in range(*seqs)]).tolist()
        assert got == tok.tokenize(text) + [tok.eod], f"document {i}"

    # Without --append-eod, and with two JSON keys: one dataset per key, no eod.
    jsonl = tmp_path / "two.jsonl"
    with open(jsonl, "w") as f:
        for text in docs[:3]:
            f.write(json.dumps({"text": text, "title": text[:20]}) + "\n\n")  # blank lines are skipped
    prefixes = preprocess_jsonl(str(jsonl), str(tmp_path / "two"), corpus["model"], json_keys=["text", "title"])
    assert set(prefixes) == {"text", "title"} and prefixes["title"].endswith("two_title_document")
    title = IndexedDataset(prefixes["title"])
    assert len(title.document_indices) - 1 == 3
    assert title[0].tolist() == tok.tokenize(docs[0][:20])


# ---------------------------------------------------------------------------------------------- datasets


def _tokens(ds, n=None):
    return torch.stack([ds[i]["tokens"] for i in range(n or len(ds))])


def test_weighted_blend_yields_documented_items(corpus, tmp_path):
    n_train, n_valid = 200, 20
    train, valid, test = build_gpt_datasets(["0.3", corpus["a"], "0.7", corpus["b"]], "90,10,0", SEQ, 1234,
                                            corpus["tok"], (n_train, n_valid, None), str(tmp_path))
    assert test is None  # split weight 0
    assert len(train) == n_train and len(valid) == n_valid
    # Without a process group the blend's own index is cached too, under Megatron's names.
    assert len(list(tmp_path.glob("*/*-BlendedDataset-train-dataset_index.npy"))) == 1
    share_b = numpy.mean([int(train[i]["dataset_id"]) for i in range(n_train)])
    assert abs(share_b - 0.7) < 0.02
    for i in (0, 1, n_train - 1):
        item = train[i]
        assert set(item) == {"dataset_id", "tokens", "labels", "loss_mask", "position_ids"}
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert item[key].shape == (SEQ,)
        assert item["tokens"].dtype == torch.int64 and item["loss_mask"].dtype == torch.float32
        assert torch.equal(item["labels"][:-1], item["tokens"][1:])  # labels = tokens shifted by one
        assert torch.equal(item["position_ids"], torch.arange(SEQ))
        assert torch.all(item["loss_mask"] == 1)
        assert int(item["tokens"].max()) < corpus["tok"].vocab_size


def test_single_prefix_gives_gpt_dataset_and_is_seed_deterministic(corpus, tmp_path):
    args = ([corpus["a"]], "100,0,0", SEQ)
    first, valid, test = build_gpt_datasets(*args, 7, corpus["tok"], (50, None, None), str(tmp_path / "c1"))
    assert valid is None and test is None
    assert set(first[0]) == {"tokens", "labels", "loss_mask", "position_ids"}
    # The same seed in a fresh cache (so the indices are rebuilt, not re-read) and without a cache dir.
    same = build_gpt_datasets(*args, 7, corpus["tok"], (50, None, None), str(tmp_path / "c2"))[0]
    assert torch.equal(_tokens(first, 50), _tokens(same, 50))
    other = build_gpt_datasets(*args, 8, corpus["tok"], (50, None, None), str(tmp_path / "c3"))[0]
    assert not torch.equal(_tokens(first, 50), _tokens(other, 50))
    # The samples tile the shuffled documents: together they hold every token of one epoch (at most one
    # partial sequence dropped).
    epoch = build_gpt_datasets(*args, 7, corpus["tok"], (None, None, None), str(tmp_path / "c4"))[0]
    total = int(sum(len(corpus["tok"].tokenize(t)) + 1 for t in corpus["docs_a"]))
    assert len(epoch) == (total - 1) // SEQ


def _dist_build(rank, world_size, prefix_a, prefix_b, model, cache_dir):
    tok = Tokenizer(model)
    train, _, _ = build_gpt_datasets(["0.5", prefix_a, "0.5", prefix_b], "100,0,0", SEQ, 3, tok,
                                     (40, None, None), cache_dir)
    return _tokens(train)


def test_datasets_under_torch_distributed_match_single_process(corpus, tmp_path):
    from megatron_utils import run_distributed

    args = (corpus["a"], corpus["b"], corpus["model"], str(tmp_path / "shared"))
    rank0, rank1 = run_distributed(_dist_build, 2, args=args, timeout=120)
    assert torch.equal(rank0, rank1)
    assert torch.equal(rank0, _dist_build(0, 1, *args[:3], str(tmp_path / "local")))


# ------------------------------------------------------------------------------------------ default corpus


def test_default_corpus_cache_hit_and_miss(tmp_path, monkeypatch):
    import megatron_simreg.data.tokenizer as tokenizer_module
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix, model = prepare_default_corpus(str(tmp_path), vocab_size=400, max_bytes=80_000)
    dataset = IndexedDataset(prefix)  # kept referenced: sequence_lengths views the mmap it closes when freed
    assert dataset.sequence_lengths.sum() > 10_000
    assert Tokenizer(model).vocab_size == 400
    stamp = os.stat(prefix + ".bin").st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("cache hit expected: nothing should be retrained")

    monkeypatch.setattr(tokenizer_module, "train_sentencepiece", no_training)
    assert prepare_default_corpus(str(tmp_path), vocab_size=400, max_bytes=80_000) == (prefix, model)
    assert os.stat(prefix + ".bin").st_mtime_ns == stamp
    monkeypatch.undo()

    other_prefix, _ = prepare_default_corpus(str(tmp_path), vocab_size=420, max_bytes=80_000)  # settings changed
    assert os.path.dirname(other_prefix) != os.path.dirname(prefix)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(  # no temporary folders left
        [os.path.basename(os.path.dirname(prefix)), os.path.basename(os.path.dirname(other_prefix))])


def test_default_corpus_documents_are_stdlib_files_capped_in_hash_order():
    docs = stdlib_documents(max_bytes=100_000)
    assert sum(len(t.encode()) for _, t in docs) <= 100_000 and all(p.endswith(".py") for p, _ in docs)
    names = [p for p, _ in docs]
    assert names == sorted(names, key=default_corpus.hash_order) and names != sorted(names)
    assert docs == stdlib_documents(max_bytes=100_000)


def test_default_corpus_has_no_generated_tables_and_its_validation_split_is_spread_over_the_tree():
    """Issue 17: the old corpus (path order, 4 MB) gave a validation split of seven encodings/cp86x.py tables."""
    from megatron_simreg.data.contamination import split_document_ranges

    stats = {}
    docs = stdlib_documents(stats=stats)
    names = [p for p, _ in docs]
    assert not any(p.startswith(("encodings/", "pydoc_data/")) or "/test/" in f"/{p}" for p in names)
    assert stats["near_duplicates"] >= 1 and stats["documents"] == len(docs) >= 300
    begin, end = split_document_ranges(len(docs), "969,30,1")[1]
    folders = {p.split("/")[0] if "/" in p else "<top>" for p in names[begin:end]}
    assert end - begin >= 10 and len(folders) >= 3, names[begin:end]


def test_near_duplicates_are_found_and_distinct_documents_kept():
    import random

    rng = random.Random(0)
    words = [f"w{i}" for i in range(2000)]
    base = [" ".join(rng.choice(words) for _ in range(400)) for _ in range(6)]
    planted = base[2].split()
    planted[100:103] = ["changed", "three", "words"]  # a near-copy: a few words edited
    docs = [(f"d{i}.py", t) for i, t in enumerate(base)] + [("copy.py", " ".join(planted))]
    assert default_corpus.near_duplicates(docs) == [("copy.py", "d2.py")]


def test_contamination_flags_a_planted_leak(tmp_path):
    """Held-out documents that copy training ones share nearly all their 13-grams with training; fresh random
    documents share almost none."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_simreg.data.contamination import WARN_SHARE, contamination, describe

    rng = numpy.random.default_rng(0)
    train = [rng.integers(0, 500, 300) for _ in range(90)]
    for name, held in (("clean", [rng.integers(0, 500, 300) for _ in range(10)]),
                       ("leak", [train[i].copy() for i in range(10)])):
        builder = IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"), dtype=numpy.uint16)
        for doc in train + held:
            builder.add_document(torch.as_tensor(doc.astype(numpy.int64)), [len(doc)])
        builder.finalize(str(tmp_path / f"{name}.idx"))
        result = contamination([str(tmp_path / name)], "90,10,0")
        assert result["valid"]["documents"] == 10 and result["test"]["shared"] is None
        share = result["valid"]["shared"]
        assert (share > 0.99) if name == "leak" else (share < 0.01), (name, share)
        assert ("above" in describe(result)) == (name == "leak") and share != WARN_SHARE


def test_interrupted_default_corpus_build_leaves_no_cache(tmp_path, monkeypatch):
    import megatron_simreg.data.preprocess as preprocess_module

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(preprocess_module, "preprocess_jsonl", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_default_corpus(str(tmp_path), vocab_size=400, max_bytes=30_000)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    prefix, _ = prepare_default_corpus(str(tmp_path), vocab_size=400, max_bytes=30_000)
    assert os.path.isfile(prefix + ".idx")
    assert default_corpus.corpus_key(400, 30_000, "bpe") == os.path.basename(os.path.dirname(prefix))


# ------------------------------------------------------------------------------------------------ errors


def test_missing_data_path_names_it_and_the_fix(corpus, tmp_path):
    missing = str(tmp_path / "nope_text_document")
    with pytest.raises(FileNotFoundError, match="nope_text_document.*tools/preprocess_data.py"):
        build_gpt_datasets(["0.5", corpus["a"], "0.5", missing], "100,0,0", SEQ, 1, corpus["tok"], (10, 0, 0), None)
    with pytest.raises(FileNotFoundError, match="without the extension"):
        build_gpt_datasets([corpus["a"] + ".bin"], "100,0,0", SEQ, 1, corpus["tok"], (10, 0, 0), None)


def test_missing_tokenizer_model(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found.*train_tokenizer.py"):
        Tokenizer(str(tmp_path / "missing.model"))
    with pytest.raises(FileNotFoundError, match="missing.model"):
        preprocess_jsonl(str(corpus["dir"] / "a.jsonl"), str(tmp_path / "x"), str(tmp_path / "missing.model"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_malformed_jsonl_names_the_line(corpus, tmp_path, workers):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: malformed JSON"):
        preprocess_jsonl(str(bad), str(tmp_path / "out"), corpus["model"], workers=workers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no partial .bin/.idx


def test_missing_json_key_names_key_and_flag(corpus, tmp_path):
    bad = tmp_path / "nokey.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"nokey.jsonl:1: JSON key 'text' missing.*\['content'\].*--json-keys"):
        preprocess_jsonl(str(bad), str(tmp_path / "out"), corpus["model"])


def test_tokenizer_vocab_larger_than_model_vocab(corpus):
    check_vocab_fits(corpus["tok"].vocab_size, 512)
    with pytest.raises(ValueError, match=r"512 tokens.*only 500 rows.*--vocab-size"):
        check_vocab_fits(corpus["tok"].vocab_size, 500)


# ------------------------------------------------------------------------------------- tools and helpers


def _tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_command_line_tools(corpus, tmp_path, capsys):
    a_jsonl = str(corpus["dir"] / "a.jsonl")
    # One real subprocess (the script runs as `python tools/...`), the rest in-process to keep the suite fast.
    out = subprocess.run([sys.executable, "tools/train_tokenizer.py", "--input", a_jsonl, "--vocab-size", str(VOCAB),
                          "--output-prefix", str(tmp_path / "tok")], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert _pieces(str(tmp_path / "tok.model")) == _pieces(train_sentencepiece([a_jsonl], str(tmp_path / "lib"), VOCAB))
    preprocess = _tool("preprocess_data")
    assert preprocess(["--input", a_jsonl, "--output-prefix", str(tmp_path / "out"),
                       "--tokenizer-model", str(tmp_path / "tok.model"), "--append-eod"]) == 0
    assert f"{len(corpus['docs_a'])} documents" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "out_text_document.bin") and os.path.isfile(tmp_path / "out_text_document.idx")
    assert preprocess(["--input", str(tmp_path / "none.jsonl"), "--output-prefix", str(tmp_path / "x"),
                       "--tokenizer-model", str(tmp_path / "tok.model")]) == 1
    assert "input file not found" in capsys.readouterr().err
    assert _tool("train_tokenizer")(["--input", str(tmp_path / "none.txt"), "--vocab-size", "300",
                                     "--output-prefix", str(tmp_path / "t")]) == 1
    assert "not found" in capsys.readouterr().err


def test_dataset_helpers_are_importable():
    path = ensure_dataset_helpers()
    assert os.path.isfile(path) and "helpers_cpp" in os.path.basename(path)


@pytest.mark.skipif(not os.environ.get("MEGATRON_SIMREG_TEST_COMPILE"),
                    reason="compiles helpers.cpp (~15 s, needs pybind11 and a C++ compiler); "
                           "set MEGATRON_SIMREG_TEST_COMPILE=1")
def test_dataset_helpers_compile_from_source(tmp_path):
    import importlib.util

    import megatron.core.datasets as pkg
    from megatron.core.datasets import helpers_cpp as shipped

    from megatron_simreg.data.helpers import compile_helpers

    so = compile_helpers(os.path.join(os.path.dirname(pkg.__file__), "helpers.cpp"), str(tmp_path))
    spec = importlib.util.spec_from_file_location("helpers_cpp", so)
    built = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(built)
    sizes, docs = numpy.array([5, 7, 3, 9], dtype=numpy.int32), numpy.array([2, 0, 3, 1], dtype=numpy.int32)
    assert numpy.array_equal(built.build_sample_idx_int32(sizes, docs, 4, 1, 24, True, 1),
                             shipped.build_sample_idx_int32(sizes, docs, 4, 1, 24, True, 1))


def test_max_token_id_reads_small_data_whole_and_samples_large_data(tmp_path):
    """The start-up token-range check: exact under its budget; past it, a spread sample still finds ids that a
    larger tokenizer's data uses throughout."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_simreg.data.datasets import max_token_id

    prefix = str(tmp_path / "d")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    rng = numpy.random.default_rng(0)
    for _ in range(50):
        doc = rng.integers(0, 1000, 2000)
        doc[rng.integers(0, 2000, 20)] = 50000 + rng.integers(0, 100, 20)  # "a bigger tokenizer's" ids, everywhere
        builder.add_document(torch.tensor(doc), [2000])
    builder.add_document(torch.tensor([60000]), [1])  # one id at the very end
    builder.finalize(prefix + ".idx")
    assert max_token_id(prefix) == 60000
    sampled = max_token_id(prefix, budget=8192, windows=16)
    assert 50000 <= sampled < 60000
