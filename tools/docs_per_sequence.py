#!/usr/bin/env python
"""How many documents a training sequence spans, per Megatron indexed dataset and sequence length.

    python tools/docs_per_sequence.py /work/prose_corpus/corpus_text_document --seq-lengths 256 512 1024
    python tools/docs_per_sequence.py --default-corpus PREFIX ...   # adds the default corpus (built if needed)

The dataset's documents (each ending in its EOD) are concatenated in stored order and cut into windows of
``s`` tokens at stride ``s`` from the start (the last, partial window dropped). A window's document count is
1 + the number of documents that start inside it after its first token, i.e. the EOD tokens among its first
``s - 1`` positions, plus 1. Printed per prefix and ``s``: windows, the mean document count, and the share of
windows that span two documents or more (attention then sees a document boundary, as in Megatron's GPT
datasets, whose shuffled document order changes which documents meet but hardly these numbers).

``--anchors N``: also, over the first ``N`` windows (labels: the window shifted by one, every token valid), the share
of SimReg's sequence-scope anchors that ``--simreg-scope document`` keeps, and the share of position pairs (an
anchor's keys) inside one document: how much of SimReg's objective pairs tokens across documents. The EOD id is read
as the last token of the first document (every document ends in it).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Sequence

import numpy as np


def docs_per_window(lengths: Sequence[int], seq_length: int) -> Dict[str, float]:
    """``{"windows", "mean_docs", "multi_doc"}`` for documents of ``lengths`` tokens and windows of
    ``seq_length`` tokens (see the module docstring)."""
    starts = np.cumsum(np.asarray(lengths, dtype=np.int64))[:-1]  # where each document after the first begins
    windows = int(np.sum(lengths)) // seq_length
    begin = np.arange(windows, dtype=np.int64) * seq_length
    inside = np.searchsorted(starts, begin + seq_length, side="left") - np.searchsorted(starts, begin, side="right")
    docs = inside + 1
    return {"windows": windows, "mean_docs": float(docs.mean()) if windows else float("nan"),
            "multi_doc": float((docs >= 2).mean()) if windows else float("nan")}


def anchors_by_scope(tokens: np.ndarray, eod: int, seq_length: int, windows: int) -> Dict[str, float]:
    """``{"sequence": n, "document": n, "pairs_kept": share}`` over the first ``windows`` windows of ``tokens``:
    SimReg's anchors per scope, and the share of position pairs that lie in one document."""
    import torch

    from megatron_simreg.config import SimRegConfig
    from megatron_simreg.losses.simreg import document_ids
    from megatron_simreg.parallel.simreg_parallel import count_step_anchors

    windows = min(windows, (len(tokens) - 1) // seq_length)
    labels = torch.from_numpy(np.stack([tokens[i * seq_length + 1:(i + 1) * seq_length + 1]
                                        for i in range(windows)]).astype(np.int64))
    out = {scope: int(count_step_anchors(labels, None, SimRegConfig(scope=scope, eod_id=eod)))
           for scope in ("sequence", "document")}
    docs = document_ids(labels, eod)
    sizes = torch.stack([torch.bincount(row, minlength=seq_length) for row in docs]).double()
    out["pairs_kept"] = float((sizes ** 2).sum() / (windows * seq_length ** 2))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prefixes", nargs="*", help="indexed dataset prefixes (PREFIX.bin / PREFIX.idx)")
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--default-corpus", action="store_true",
                   help="also the default corpus, as the trainer builds it (~/.cache/megatron_simreg)")
    p.add_argument("--anchors", type=int, default=0, metavar="N",
                   help="also count SimReg's anchors per scope over the first N windows")
    args = p.parse_args(argv)

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefixes = list(args.prefixes)
    if args.default_corpus:
        from megatron_simreg.data.default_corpus import prepare_default_corpus

        prefixes.append(prepare_default_corpus(os.path.join(os.path.expanduser("~"), ".cache", "megatron_simreg"))[0])
    if not prefixes:
        p.error("give at least one prefix or --default-corpus")
    print(f"{'dataset':<60} {'docs':>6} {'tokens':>10} {'seq':>5} {'windows':>8} {'docs/seq':>8} {'>=2 docs':>8}"
          + (f" {'document scope keeps: anchors, of':>34} {'pairs':>6}" if args.anchors else ""))
    for prefix in prefixes:
        dataset = IndexedDataset(prefix)  # kept referenced: sequence_lengths views the mmap it closes when freed
        lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)
        tokens = np.concatenate([dataset[i] for i in range(len(dataset))]) if args.anchors else None
        for s in args.seq_lengths:
            r = docs_per_window(lengths, s)
            line = (f"{prefix[-60:]:<60} {len(lengths):>6} {int(lengths.sum()):>10,} {s:>5} {r['windows']:>8} "
                    f"{r['mean_docs']:>8.2f} {r['multi_doc']:>8.1%}")
            if args.anchors:
                a = anchors_by_scope(tokens, int(dataset[0][-1]), s, args.anchors)
                line += f" {a['document'] / a['sequence']:>20.1%} of {a['sequence']:>10,} {a['pairs_kept']:>6.1%}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
