"""How much of the validation and test splits the training split already contains (n-gram overlap).

Megatron's ``--split`` takes *contiguous* documents (``round(fraction * documents)`` boundaries, as in
``BlendedMegatronDatasetBuilder``), so a corpus sorted by path or source gives validation documents that are
near-copies of training ones, and a validation loss that measures memorisation. The check, per held-out split:
the share of its token ``n``-grams (windows inside one document, ``n`` = :data:`NGRAM` tokens, GPT-3's
contamination length) that also occur anywhere in the training split. Printed by ``train`` for the default
corpus, and for ``--data-path`` with ``--check-contamination``; ``compare`` records it and warns in its
report above :data:`WARN_SHARE`.

Exact n-gram matching, on 64-bit rolling hashes of the token windows (a hash collision can only overstate the
share, by about ``windows / 2**64``).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

NGRAM = 13
# Measured with --split 969,30,1 (CPython 3.11): the default corpus's validation split shares 0.014 of its
# 13-grams with training; the old path-sorted corpus's (seven encodings/cp86x.py tables) shared 0.851.
WARN_SHARE = 0.2
SPLITS = ("valid", "test")


def split_document_ranges(num_documents: int, split: str) -> List[Tuple[int, int]]:
    """``[(begin, end)]`` document ranges of train / valid / test, exactly as megatron-core splits them."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [(0, 0) if span is None else (int(round(span[0] * float(num_documents))),
                                         int(round(span[1] * float(num_documents)))) for span in matrix]


def ngram_hashes(tokens: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """``[len(tokens) - n + 1]`` uint64 hashes of every ``n``-token window (empty when the document is shorter)."""
    t = np.asarray(tokens, dtype=np.uint64) + np.uint64(1)
    if len(t) < n:
        return np.zeros(0, dtype=np.uint64)
    base = np.uint64(0x100000001B3)  # FNV prime: uint64 arithmetic wraps, a polynomial hash mod 2**64
    h = np.zeros(len(t) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * base + t[k:len(t) - n + 1 + k]
    return h


def _hashes(dataset, begin: int, end: int, n: int) -> np.ndarray:
    parts = [ngram_hashes(dataset[i], n) for i in range(begin, end)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def contamination(prefixes: Sequence[str], split: str, n: int = NGRAM) -> Dict[str, dict]:
    """``{"valid"|"test": {"documents", "ngrams", "shared"}}`` over every dataset ``prefix`` (each split as
    megatron-core splits it): ``shared`` = the share of the split's ``n``-grams found in the training split
    (``None`` for an empty split)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    counts = {name: [0, 0, 0] for name in SPLITS}  # documents, n-grams, shared n-grams
    for prefix in prefixes:
        dataset = IndexedDataset(prefix)
        ranges = split_document_ranges(len(dataset), split)
        train = np.unique(_hashes(dataset, *ranges[0], n))
        for name, (begin, end) in zip(SPLITS, ranges[1:]):
            held = _hashes(dataset, begin, end, n)
            c = counts[name]
            c[0] += end - begin
            c[1] += len(held)
            at = np.minimum(np.searchsorted(train, held), max(len(train) - 1, 0))
            c[2] += int((train[at] == held).sum()) if len(train) else 0
    return {name: {"documents": d, "ngrams": g, "shared": (s / g if g else None)}
            for name, (d, g, s) in counts.items()}


def describe(result: Dict[str, dict]) -> str:
    """One line for the log; flags a share above :data:`WARN_SHARE`."""
    parts = []
    for name in SPLITS:
        r = result[name]
        if r["shared"] is None:
            continue
        flag = (f" (above {WARN_SHARE}: held-out documents repeat training ones; shuffle the corpus's documents "
                "or remove near-duplicates)") if r["shared"] > WARN_SHARE else ""
        parts.append(f"{name} {r['shared']:.3f} of {r['ngrams']:,} {NGRAM}-grams in {r['documents']} documents{flag}")
    return "contamination (held-out n-grams also in training): " + ("; ".join(parts) or "no held-out split")
