#!/usr/bin/env python
"""Train a SentencePiece tokenizer (byte fallback, deterministic) on text or JSONL files.

    python tools/train_tokenizer.py --input docs.jsonl --json-keys text --vocab-size 4096 --output-prefix tok
    # -> tok.model, tok.vocab; then: tools/preprocess_data.py --tokenizer-model tok.model ...

Files ending in .jsonl/.json are read as one JSON object per line (the --json-keys fields); any other file
is one plain-text document. The logic is megatron_simreg.data.tokenizer.train_sentencepiece.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="text or JSONL files")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSONL fields holding the text")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--num-threads", type=int, default=1, help="part of the result: keep it fixed to reproduce")
    args = p.parse_args(argv)

    from megatron_simreg.data.tokenizer import Tokenizer, train_sentencepiece

    try:
        model = train_sentencepiece(args.input, args.output_prefix, args.vocab_size, model_type=args.model_type,
                                    json_keys=args.json_keys, seed=args.seed, num_threads=args.num_threads)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {model} ({Tokenizer(model).vocab_size} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
