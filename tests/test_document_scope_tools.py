"""The tools behind docs/results.md's document-scope comparison: ``tools/docs_per_sequence.py`` (documents and SimReg
anchors per sequence), ``tools/make_prose_corpus.py`` (the English prose corpus) and ``tools/compare_methods.py`` (two
methods of a grid paired by seed)."""

import importlib.util
import json
import stat
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_per_sequence_tool_counts_by_hand():
    """The numbers docs/results.md quotes for the comparison's sequence length, on a stream small enough to count."""
    tool = _tool("docs_per_sequence")
    # documents of 3, 5 and 2 tokens (EOD included) in windows of 4: [0, 4) holds 2 documents, [4, 8) one
    assert tool.docs_per_window([3, 5, 2], 4) == {"windows": 2, "mean_docs": 1.5, "multi_doc": 0.5}
    # EOD = 9; two windows of 4 labels (tokens 1..4 and 5..8): "7 9 7 7" and "7 9 7 9"
    tokens = np.array([0, 7, 9, 7, 7, 7, 9, 7, 9])
    got = tool.anchors_by_scope(tokens, eod=9, seq_length=4, windows=2)
    # window 1: documents [7 9 7] [7] (position 3 follows the input EOD at 2): sequence scope has anchors at the
    # three 7s, document scope at the first two; window 2: [7 9 7] [9]: the 7s in both scopes (the 9s are split)
    assert (got["sequence"], got["document"]) == (3 + 4, 2 + 2)
    assert got["pairs_kept"] == (3 ** 2 + 1 + 3 ** 2 + 1) / (2 * 16)


def test_prose_corpus_cuts_chapters_from_the_decoders_output(tmp_path):
    """tools/make_prose_corpus.py's chapter parser, on output in the `bible` decoder's format (a stand-in script:
    CI has no bible-kjv package)."""
    fake = tmp_path / "bible"
    fake.write_text("#!/bin/sh\nprintf '\\nGenesis 1\\n\\n  1 In the  beginning.\\n  2 And the earth.\\n"
                    "\\nSong of Solomon 2\\n\\n  1 I am the rose.\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    assert _tool("make_prose_corpus").chapters(str(fake)) == [
        ("Genesis 1", "Genesis 1\n\nIn the beginning.\nAnd the earth.\n"),
        ("Song of Solomon 2", "Song of Solomon 2\n\nI am the rose.\n")]


def test_compare_methods_pairs_two_methods_by_seed(tmp_path, capsys):
    runs = {f"dense.{m}.s{seed}": {"final_val_loss": loss}
            for m, losses in {"a": [5.0, 5.2, 5.1], "b": [5.1, 5.2, 5.4]}.items()
            for seed, loss in zip([1, 2, 3], losses)}
    del runs["dense.b.s3"]["final_val_loss"]  # an unfinished run leaves its seed out
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"models": ["dense"], "methods": ["baseline", "a", "b"], "seeds": [1, 2, 3],
                                "runs": runs}))
    tool = _tool("compare_methods")
    assert tool.paired_finals(json.loads(path.read_text()), "a", "b") == {"dense": [(1, 5.0, 5.1), (2, 5.2, 5.2)]}
    assert tool.main([str(path), "a", "b"]) == 0
    out = capsys.readouterr().out
    assert "seed 1: 5.0000 - 5.1000 = -0.1000" in out and "n=2: fewer than 3 seeds" in out
