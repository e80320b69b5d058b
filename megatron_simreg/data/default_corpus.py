"""The default pretraining corpus: this Python's standard library source, tokenized and indexed, no download.

A fair sample, so that its validation split measures what training learns (issue 17: the old corpus was sorted
by path, so Megatron's contiguous split made the validation set seven ``encodings/cp86x.py`` tables):

- Documents are the stdlib's ``.py`` files (``sysconfig.get_paths()["stdlib"]``, recursively), one file = one
  document, read as UTF-8 (other files skipped). Left out: ``site-packages``/``dist-packages``; test folders
  (``test``, ``tests``, ``idle_test``: their fixtures include deliberately broken encodings); and generated
  files: ``encodings/`` (character-mapping tables) and ``pydoc_data/`` (one generated string table).
- Near-duplicates are dropped: MinHash (``datasketch``, the maintained reference implementation, 128
  permutations) over word 5-gram shingles with LSH at Jaccard :data:`DEDUP_THRESHOLD`; of a group, the
  file first in path order stays. :func:`stdlib_documents` returns how many were dropped.
- The rest is ordered by a deterministic hash (SHA-256 of the relative path), not by path, so that Megatron's
  contiguous ``--split`` gives validation and test sets of random documents from across the tree.
- ``max_bytes`` caps the total: documents are taken in hash order and the last one is cut at a line boundary.

:func:`prepare_default_corpus` builds, under ``cache_dir/<key>/``:

- ``corpus.jsonl``: ``{"text": ..., "path": ...}`` per document, in training order;
- ``tokenizer.model`` / ``.vocab``: SentencePiece (BPE, byte fallback) trained on the corpus, unless a
  tokenizer is given (``--tokenizer-model``, e.g. an imported model's HF tokenizer), which then tokenizes it;
- ``corpus_text_document.bin`` / ``.idx``: the Megatron indexed dataset, ``eod`` appended to each document;
- ``DONE``: what was built, with the preparation time.

``key`` hashes the file list with sizes and every setting, so a second call with the same inputs returns at
once and any change (another Python, another cap or vocabulary, a new recipe) builds a new entry. A build happens
in a temporary sibling folder renamed to ``<key>`` when complete: an interrupted build leaves no entry that
looks finished, and of two concurrent builds one rename wins and the other is discarded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

DEFAULT_MAX_BYTES = 6_000_000  # of ~9.5 MB left after the filters (CPython 3.11); see DONE for the time
DEFAULT_VOCAB_SIZE = 4096
DEDUP_THRESHOLD = 0.7  # MinHash-estimated Jaccard similarity of word 5-gram sets above which a file is a duplicate
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_GENERATED_DIRS = {"encodings", "pydoc_data"}  # top-level folders of generated tables
_FORMAT_VERSION = 2  # bump when the layout or the recipe changes, to invalidate old cache entries


def stdlib_files(root: Optional[str] = None) -> List[Path]:
    """The stdlib's ``.py`` files but the excluded and generated folders, sorted by path relative to ``root``
    (default: this Python's stdlib)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for p in root.rglob("*.py"):
        parts = p.relative_to(root).parts
        if _EXCLUDED_DIRS.intersection(parts[:-1]) or (len(parts) > 1 and parts[0] in _GENERATED_DIRS):
            continue
        if p.is_file():
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _shingles(text: str, n: int = 5) -> List[bytes]:
    words = text.split()
    return [" ".join(words[i:i + n]).encode() for i in range(max(1, len(words) - n + 1))]


def near_duplicates(docs: Sequence[Tuple[str, str]], threshold: float = DEDUP_THRESHOLD) -> List[Tuple[str, str]]:
    """``[(dropped, kept)]``: each document whose estimated Jaccard similarity (MinHash over word 5-gram
    shingles, LSH) with an earlier kept one reaches ``threshold``, and that earlier document."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    dropped = []
    for name, text in docs:
        m = MinHash(num_perm=128, seed=1)
        m.update_batch(_shingles(text))
        hits = lsh.query(m)
        if hits:
            dropped.append((name, sorted(hits)[0]))
        else:
            lsh.insert(name, m)
    return dropped


def hash_order(name: str) -> str:
    """The sort key that spreads documents over the split: SHA-256 of the name (deterministic, path-independent)."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def stdlib_documents(max_bytes: Optional[int] = DEFAULT_MAX_BYTES, root: Optional[str] = None,
                     stats: Optional[dict] = None) -> List[Tuple[str, str]]:
    """``[(relative_path, text)]`` in training order (near-duplicates dropped, hash order), at most ``max_bytes``
    UTF-8 bytes in all (``None``: no cap). ``stats``, when given, receives the counts of each step."""
    root_path = Path(root or sysconfig.get_paths()["stdlib"])
    docs = []
    for path in stdlib_files(str(root_path)):
        try:
            docs.append((path.relative_to(root_path).as_posix(), path.read_bytes().decode("utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    dropped = near_duplicates(docs)
    gone = {name for name, _ in dropped}
    docs = sorted((d for d in docs if d[0] not in gone), key=lambda d: hash_order(d[0]))
    out, total = [], 0
    for name, text in docs:
        size = len(text.encode("utf-8"))
        if max_bytes is not None and total + size > max_bytes:
            head = text.encode("utf-8")[:max_bytes - total].decode("utf-8", errors="ignore")
            text = head[: head.rfind("\n") + 1]  # the last document, cut at a line boundary within the budget
            if text.strip():
                out.append((name, text))
                total += len(text.encode("utf-8"))
            break
        out.append((name, text))
        total += size
    if stats is not None:
        stats.update(files=len(docs) + len(dropped), near_duplicates=len(dropped), documents=len(out), bytes=total)
    return out


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
    started = time.perf_counter()
    tmp = tempfile.mkdtemp(dir=cache_dir, prefix=f".{os.path.basename(final)}.tmp-")
    try:
        jsonl = os.path.join(tmp, "corpus.jsonl")
        stats: dict = {}
        docs = stdlib_documents(max_bytes, stats=stats)
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
            json.dump({**stats, "vocab_size": vocab_size, "max_bytes": max_bytes, "model_type": model_type,
                       "tokenizer": given, "prepare_seconds": round(time.perf_counter() - started, 1)}, f)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isfile(os.path.join(final, "DONE")):  # not a concurrent winner: a real failure
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return prefix, model
