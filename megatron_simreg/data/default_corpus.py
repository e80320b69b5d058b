"""The default pretraining corpus: this Python's standard library source, tokenized and indexed, no download.

Documents are the stdlib's ``.py`` files (``sysconfig.get_paths()["stdlib"]``, recursively, without
``site-packages``/``dist-packages`` and the ``test``/``tests`` folders, whose fixtures include deliberately
broken encodings), sorted by relative path, one file = one document, read as UTF-8 (files that are not
UTF-8 are skipped). ``max_bytes`` caps the total: files are taken in order and the last one is cut at a
line boundary to fit.

:func:`prepare_default_corpus` builds, under ``cache_dir/<key>/``:

- ``corpus.jsonl``: ``{"text": ..., "path": ...}`` per document;
- ``tokenizer.model`` / ``.vocab``: SentencePiece (BPE, byte fallback) trained on the corpus, unless a
  tokenizer is given (``--tokenizer-model``, e.g. an imported model's HF tokenizer), which then tokenizes it;
- ``corpus_text_document.bin`` / ``.idx``: the Megatron indexed dataset, ``eod`` appended to each document.

``key`` hashes the file list with sizes and every setting, so a second call with the same inputs returns at
once and any change (another Python, another cap or vocabulary) builds a new entry. A build happens in a
temporary sibling folder renamed to ``<key>`` when complete: an interrupted build leaves no entry that
looks finished, and of two concurrent builds one rename wins and the other is discarded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

DEFAULT_MAX_BYTES = 4_000_000  # ~1.3 M tokens at vocab 4096; the whole prepare takes ~3 s on 2 cores
DEFAULT_VOCAB_SIZE = 4096
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
_FORMAT_VERSION = 1  # bump when the layout or the recipe changes, to invalidate old cache entries


def stdlib_files(root: Optional[str] = None) -> List[Path]:
    """The stdlib's ``.py`` files, sorted by path relative to ``root`` (default: this Python's stdlib)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]) and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_documents(max_bytes: Optional[int] = DEFAULT_MAX_BYTES, root: Optional[str] = None
                     ) -> List[Tuple[str, str]]:
    """``[(relative_path, text)]`` in order, at most ``max_bytes`` UTF-8 bytes in all (``None``: no cap)."""
    root_path = Path(root or sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in stdlib_files(str(root_path)):
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        size = len(text.encode("utf-8"))
        if max_bytes is not None and total + size > max_bytes:
            # Cut the last document at a line boundary within the remaining budget.
            room = max_bytes - total
            head = text.encode("utf-8")[:room].decode("utf-8", errors="ignore")
            text = head[: head.rfind("\n") + 1]
            size = len(text.encode("utf-8"))
            if text.strip():
                docs.append((path.relative_to(root_path).as_posix(), text))
                total += size
            break
        docs.append((path.relative_to(root_path).as_posix(), text))
        total += size
    return docs


def corpus_key(vocab_size: int, max_bytes: Optional[int], model_type: str, root: Optional[str] = None,
               tokenizer: Optional[dict] = None) -> str:
    """The cache key: the stdlib file list with sizes plus every setting that changes the result (``tokenizer``:
    a given tokenizer's type and content hash)."""
    root_path = Path(root or sysconfig.get_paths()["stdlib"])
    h = hashlib.sha256()
    settings = {"format": _FORMAT_VERSION, "vocab_size": vocab_size, "max_bytes": max_bytes, "model_type": model_type}
    if tokenizer:
        settings = {"format": _FORMAT_VERSION, "max_bytes": max_bytes, "tokenizer": tokenizer}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for path in stdlib_files(str(root_path)):
        h.update(f"{path.relative_to(root_path).as_posix()}\0{path.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def prepare_default_corpus(
    cache_dir: str,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_bytes: Optional[int] = DEFAULT_MAX_BYTES,
    model_type: str = "bpe",
    workers: int = 1,
    tokenizer_type: Optional[str] = None,
    tokenizer_model: Optional[str] = None,
) -> Tuple[str, str]:
    """Build (or reuse) the default corpus; returns ``(data_prefix, tokenizer_model_path)``.

    With ``tokenizer_model`` (of ``tokenizer_type``) the corpus is tokenized with it and no tokenizer is trained.

    ``data_prefix`` is the indexed dataset prefix for :func:`~megatron_simreg.data.datasets.build_gpt_datasets`.
    Under ``torch.distributed``, call it on one rank (or on all: concurrent builds are safe, only one wins)
    and barrier before the others read the result.
    """
    from .preprocess import preprocess_jsonl
    from .tokenizer import SENTENCEPIECE, tokenizer_sha256, train_sentencepiece

    given = None
    if tokenizer_model:
        given = {"type": tokenizer_type or SENTENCEPIECE, "sha256": tokenizer_sha256(tokenizer_model)}
    final = os.path.join(cache_dir, corpus_key(vocab_size, max_bytes, model_type, tokenizer=given))
    prefix = os.path.join(final, "corpus_text_document")
    model = os.path.abspath(tokenizer_model) if given else os.path.join(final, "tokenizer.model")
    if os.path.isfile(os.path.join(final, "DONE")):
        return prefix, model

    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir, prefix=f".{os.path.basename(final)}.tmp-")
    try:
        jsonl = os.path.join(tmp, "corpus.jsonl")
        docs = stdlib_documents(max_bytes)
        if not docs:
            raise RuntimeError(f"no stdlib .py files found under {sysconfig.get_paths()['stdlib']!r}")
        with open(jsonl, "w", encoding="utf-8") as f:
            for rel, text in docs:
                f.write(json.dumps({"text": text, "path": rel}) + "\n")
        if given:
            preprocess_jsonl(jsonl, os.path.join(tmp, "corpus"), model, append_eod=True, workers=workers,
                             tokenizer_type=given["type"])
        else:
            train_sentencepiece([jsonl], os.path.join(tmp, "tokenizer"), vocab_size, model_type=model_type)
            preprocess_jsonl(jsonl, os.path.join(tmp, "corpus"), os.path.join(tmp, "tokenizer.model"),
                             append_eod=True, workers=workers)
        with open(os.path.join(tmp, "DONE"), "w") as f:
            json.dump({"documents": len(docs), "bytes": sum(len(t.encode()) for _, t in docs),
                       "vocab_size": vocab_size, "max_bytes": max_bytes, "model_type": model_type,
                       "tokenizer": given}, f)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isfile(os.path.join(final, "DONE")):  # not a concurrent winner: a real failure
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return prefix, model
