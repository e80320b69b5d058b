"""JSONL -> Megatron indexed dataset (``.bin`` token ids + ``.idx`` lengths), like Megatron-LM's preprocess_data.py.

Input: one JSON object per line, one document per line; blank lines are skipped. For each ``json_keys`` entry
the output is ``{output_prefix}_{key}_document.bin`` / ``.idx`` (Megatron-LM's names), one document per input
line, in input order, written with ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`` with
Megatron-LM's dtype choice (uint16 below 65500 tokens, else int32). A document's tokens are
``tokenize(text)`` plus ``eod`` when ``append_eod``; an empty text gives an empty document, as in Megatron-LM.

Both files are written under temporary names and renamed at the end (``.idx`` last), so an interrupted run
never leaves a prefix that ``IndexedDataset.exists`` accepts.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Dict, List, Optional, Sequence, Tuple

from .tokenizer import SENTENCEPIECE, build_tokenizer, json_field, parse_json_line


def document_prefix(output_prefix: str, key: str) -> str:
    """Megatron-LM's dataset prefix for one JSON key: ``{output_prefix}_{key}_document``."""
    return f"{output_prefix}_{key}_document"


# Per-process encoder state: set once per worker by ``_init_worker`` (the tokenizer is loaded in each worker
# rather than pickled per task).
_STATE: dict = {}


def _init_worker(tokenizer_type: str, tokenizer_model: str, input_path: str, json_keys: Tuple[str, ...],
                 append_eod: bool) -> None:
    _STATE.update(tokenizer=build_tokenizer(tokenizer_type, tokenizer_model), path=input_path, keys=json_keys,
                  eod=append_eod)


def _encode(item: Tuple[int, str]) -> Optional[Dict[str, List[int]]]:
    line_no, line = item
    if not line.strip():
        return None
    record = parse_json_line(line, _STATE["path"], line_no)
    tokenizer = _STATE["tokenizer"]
    out = {}
    for key in _STATE["keys"]:
        ids = tokenizer.tokenize(json_field(record, key, _STATE["path"], line_no))
        if _STATE["eod"]:
            ids.append(tokenizer.eod)
        out[key] = ids
    return out


def preprocess_jsonl(
    input_path: str,
    output_prefix: str,
    tokenizer_model: str,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    chunksize: int = 32,
    tokenizer_type: str = SENTENCEPIECE,
) -> Dict[str, str]:
    """Tokenize ``input_path`` (JSONL) into one indexed dataset per key; returns ``{key: dataset_prefix}``.

    ``tokenizer_type``: Megatron-LM's ``SentencePieceTokenizer`` (``tokenizer_model`` a ``.model``) or
    ``HuggingFaceTokenizer`` (a local directory with ``tokenizer.json``; no special tokens are added, the EOD is
    its eos token). ``workers > 1`` tokenizes in a process pool (order preserved). Errors: a missing input file or
    tokenizer model -> ``FileNotFoundError``; a malformed line, a missing key or a non-string value ->
    ``ValueError`` naming the file, the line number and the fix. Nothing is left at the output paths after an error.
    """
    import numpy
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"input file not found: {input_path!r}. Fix: pass --input with an existing "
                                f"JSONL file (one JSON object per line, e.g. {{\"text\": \"...\"}}).")
    json_keys = tuple(json_keys)
    if not json_keys:
        raise ValueError("json_keys is empty. Fix: pass at least one key, e.g. --json-keys text.")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)  # fails early, and clearly, on a missing model
    dtype = DType.optimal_dtype(tokenizer.vocab_size)

    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    prefixes = {key: document_prefix(output_prefix, key) for key in json_keys}
    tmp = {key: (f"{p}.bin.tmp{os.getpid()}", f"{p}.idx.tmp{os.getpid()}") for key, p in prefixes.items()}
    builders = {key: IndexedDatasetBuilder(tmp[key][0], dtype=dtype) for key in json_keys}
    init_args = (tokenizer_type, tokenizer.model_path, input_path, json_keys, append_eod)
    try:
        with open(input_path, encoding="utf-8") as f:
            lines = enumerate(f, start=1)
            if workers == 1:
                _init_worker(*init_args)
                encoded = map(_encode, lines)
                docs = _write(encoded, builders, numpy)
            else:
                with multiprocessing.Pool(workers, _init_worker, init_args) as pool:
                    docs = _write(pool.imap(_encode, lines, chunksize), builders, numpy)
        if docs == 0:
            raise ValueError(f"{input_path} holds no documents (only blank lines). "
                             f"Fix: write one JSON object per line, e.g. {{\"text\": \"...\"}}.")
        for key, builder in builders.items():
            builder.finalize(tmp[key][1])
        for key, prefix in prefixes.items():  # .idx last: IndexedDataset.exists needs both
            os.replace(tmp[key][0], prefix + ".bin")
            os.replace(tmp[key][1], prefix + ".idx")
    except BaseException:
        for key, builder in builders.items():
            builder.data_file.close()
            for path in tmp[key]:
                if os.path.exists(path):
                    os.remove(path)
        raise
    finally:
        _STATE.clear()
    return prefixes


def _write(encoded, builders, numpy) -> int:
    docs = 0
    for doc in encoded:
        if doc is None:
            continue
        for key, ids in doc.items():
            # One sentence per document (no --split-sentences): the document is one sequence of len(ids).
            builders[key].add_document(numpy.asarray(ids, dtype=numpy.int64), [len(ids)] if ids else [])
        docs += 1
    return docs
