#!/usr/bin/env python
"""Build an English prose corpus from a Debian package: the King James Bible, one chapter = one document.

    apt-get install -y bible-kjv        # Debian bookworm 4.38; pulls in bible-kjv-text 4.38 (the text)
    python tools/make_prose_corpus.py --out /work/prose_corpus
    # -> OUT/corpus.jsonl, OUT/tokenizer.model/.vocab, OUT/corpus_text_document.bin/.idx, OUT/STATS.json
    # grid: data: {data-path: OUT/corpus_text_document, tokenizer-model: OUT/tokenizer.model}

Source: ``bible-kjv-text`` ships the text in its own compressed format (``/usr/lib/bible.data``); the
``bible`` program of ``bible-kjv`` decodes it (``bible -l100000 gen1:1-rev22:21``: every verse, unwrapped).
License: the KJV text (1611) is in the public domain (see ``/usr/share/doc/bible-kjv-text/copyright``); the
decoder is GPL-2+, but only its output is used here. 66 books of narrative, law, poetry, prophecy and letters.

The recipe is the default corpus's (megatron_simreg/data/default_corpus.py), with chapters for files:

- documents: the 1,189 chapters, named ``"<Book> <n>"`` (e.g. ``"1 Samuel 17"``); a document's text is its
  name, a blank line, then one verse per line without its number (whitespace inside a verse squeezed to one
  space), ending in a newline;
- near-duplicates dropped with :func:`~megatron_simreg.data.default_corpus.near_duplicates` (of a group, the
  chapter first in canonical order stays), the rest ordered by
  :func:`~megatron_simreg.data.default_corpus.hash_order` of the name, so Megatron's contiguous ``--split``
  gives validation and test sets of chapters from across the book;
- tokenizer: :func:`~megatron_simreg.data.tokenizer.train_sentencepiece` on ``corpus.jsonl`` with the default
  corpus's settings (BPE, vocabulary 4096, byte fallback); dataset:
  :func:`~megatron_simreg.data.preprocess.preprocess_jsonl` with the end-of-document token appended.

Document lengths in ``STATS.json`` count tokens with the EOD; contamination is
:func:`~megatron_simreg.data.contamination.contamination` for ``--split`` (default 969,30,1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

PACKAGES = ("bible-kjv", "bible-kjv-text")
_HEADING = re.compile(r"^(?:[1-3] )?[A-Z][A-Za-z ]* \d+$")  # "Genesis 1", "Song of Solomon 2", "1 John 3"
_VERSE = re.compile(r"^\s*\d+ (.*)$")


def package_versions() -> dict:
    """``{package: version}`` of the installed :data:`PACKAGES` (``dpkg-query``)."""
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\n", *PACKAGES],
                         check=True, capture_output=True, text=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def chapters(bible: str = "bible") -> list:
    """``[(name, text)]``: every chapter of the KJV in canonical order, decoded by the ``bible`` program."""
    out = subprocess.run([bible, "-l100000", "gen1:1-rev22:21"], check=True, capture_output=True, text=True).stdout
    docs, name, verses = [], None, []
    for line in out.splitlines():
        if _HEADING.match(line):
            if name:
                docs.append((name, name + "\n\n" + "\n".join(verses) + "\n"))
            name, verses = line, []
        elif line.strip():
            m = _VERSE.match(line)
            if not m:
                raise ValueError(f"unexpected line in the bible output: {line[:80]!r}")
            verses.append(" ".join(m.group(1).split()))
    docs.append((name, name + "\n\n" + "\n".join(verses) + "\n"))
    return docs


def length_stats(lengths) -> dict:
    """Count, total, mean, median, p10 and p90 of document lengths in tokens."""
    import numpy as np

    q = np.percentile(lengths, [10, 50, 90])
    return {"documents": int(len(lengths)), "tokens": int(np.sum(lengths)), "mean": round(float(np.mean(lengths)), 1),
            "median": float(q[1]), "p10": float(q[0]), "p90": float(q[2])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--split", default="969,30,1", help="Megatron --split for the contamination check")
    p.add_argument("--bible", default="bible", help="the bible-kjv decoder program")
    args = p.parse_args(argv)

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_simreg.data.contamination import contamination, describe
    from megatron_simreg.data.default_corpus import DEFAULT_VOCAB_SIZE, hash_order, near_duplicates
    from megatron_simreg.data.preprocess import preprocess_jsonl
    from megatron_simreg.data.tokenizer import train_sentencepiece

    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    docs = chapters(args.bible)
    dropped = near_duplicates(docs)
    gone = {name for name, _ in dropped}
    docs = sorted((d for d in docs if d[0] not in gone), key=lambda d: hash_order(d[0]))
    jsonl = os.path.join(args.out, "corpus.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        for name, text in docs:
            f.write(json.dumps({"text": text, "path": name}) + "\n")
    model = train_sentencepiece([jsonl], os.path.join(args.out, "tokenizer"), DEFAULT_VOCAB_SIZE, model_type="bpe")
    prefix = preprocess_jsonl(jsonl, os.path.join(args.out, "corpus"), model, append_eod=True)["text"]

    dataset = IndexedDataset(prefix)  # kept referenced: its sequence_lengths view the mmap it closes when freed
    stats = {"source": package_versions(), "chapters": len(docs) + len(dropped),
             "near_duplicates": [list(pair) for pair in dropped], "bytes": os.path.getsize(jsonl),
             "vocab_size": DEFAULT_VOCAB_SIZE, "model_type": "bpe", **length_stats(dataset.sequence_lengths),
             "split": args.split, "contamination": contamination([prefix], args.split)}
    stats["prepare_seconds"] = round(time.perf_counter() - started, 1)
    with open(os.path.join(args.out, "STATS.json"), "w") as f:
        json.dump(stats, f, indent=1)
    print(f"source: {', '.join(f'{k} {v}' for k, v in stats['source'].items())}")
    print(f"documents: {stats['documents']} of {stats['chapters']} chapters; near-duplicates dropped: "
          + (", ".join(f"{a} (~ {b})" for a, b in dropped) or "none"))
    print(f"tokens: {stats['tokens']:,} (EOD included); document length mean {stats['mean']}, median "
          f"{stats['median']:.0f}, p10 {stats['p10']:.0f}, p90 {stats['p90']:.0f}")
    print(f"split {args.split}: {describe(stats['contamination'])}")
    print(f"data-path: {prefix}\ntokenizer-model: {model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
