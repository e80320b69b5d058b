#!/usr/bin/env python
"""Tokenize a JSONL file into Megatron indexed datasets (Megatron-LM's preprocess_data.py flags and names).

    python tools/preprocess_data.py --input docs.jsonl --output-prefix data/docs \
        --tokenizer-model tok.model --append-eod --workers 2
    # -> data/docs_text_document.bin / .idx; pass data/docs_text_document as the data path
    python tools/preprocess_data.py --input docs.jsonl --output-prefix data/docs \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model path/to/hf_model_dir --append-eod

One JSON object per line, one document per line. The logic is megatron_simreg.data.preprocess.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="JSONL file, one document per line")
    p.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    p.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                   choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"], help="Megatron-LM's names")
    p.add_argument("--tokenizer-model", required=True,
                   help="SentencePiece .model (tools/train_tokenizer.py), or with --tokenizer-type "
                        "HuggingFaceTokenizer a local directory holding tokenizer.json (never downloaded)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON fields to tokenize, one dataset each")
    p.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    args = p.parse_args(argv)

    from megatron_simreg.data.preprocess import preprocess_jsonl
    from megatron_simreg.data.tokenizer import check_tokenizer_path

    try:  # a wrong kind of tokenizer path: exit 2 with the flag to pass
        check_tokenizer_path(args.tokenizer_type, args.tokenizer_model)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    start = time.time()
    try:
        prefixes = preprocess_jsonl(args.input, args.output_prefix, args.tokenizer_model,
                                    json_keys=args.json_keys, append_eod=args.append_eod, workers=args.workers,
                                    tokenizer_type=args.tokenizer_type)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for key, prefix in prefixes.items():
        ds = IndexedDataset(prefix)
        print(f"{key}: {prefix}.bin/.idx: {len(ds.document_indices) - 1} documents, "
              f"{int(ds.sequence_lengths.sum())} tokens")
    print(f"done in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
