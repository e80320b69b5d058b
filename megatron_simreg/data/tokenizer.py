"""SentencePiece tokenizer: deterministic training and a small Megatron-compatible wrapper.

Training settings and why:

- ``byte_fallback=True``: the 256 byte pieces ``<0x00>`` … ``<0xFF>`` are always in the vocabulary, so any
  text encodes without ``<unk>`` (an unseen character becomes its UTF-8 bytes).
- ``normalization_rule_name="identity"``, ``remove_extra_whitespaces=False``, ``add_dummy_prefix=False``,
  ``allow_whitespace_only_pieces=True``: no NFKC folding, no whitespace squeezing and no leading space, so
  ``detokenize(tokenize(text)) == text`` for source code, indentation included (one caveat: a literal
  ``▁`` U+2581 in the input decodes as a space, as in every SentencePiece model).
- Determinism: a fixed ``num_threads`` (the learned pieces depend on it), the whole input used in file
  order (``input_sentence_size=0``, ``shuffle_input_sentence=False``) and a fixed
  ``set_random_generator_seed``. The same inputs and settings give the same pieces and scores.
- Special ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2 (the end-of-document token, ``eod``); no pad piece.

SentencePiece trains on *lines*: each non-blank line of each document is one training sentence. A newline
is therefore never a learned piece; it encodes as the byte piece ``<0x0A>`` (one token).

Hugging Face tokenizers (Megatron-LM's ``--tokenizer-type HuggingFaceTokenizer``): :func:`build_tokenizer` returns
a :class:`HFTokenizer` for a local directory holding ``tokenizer.json`` / ``tokenizer_config.json`` (never a
download). It follows Megatron-LM's ``_HuggingFaceTokenizer``: ``vocab_size = len(tokenizer)`` (added tokens
included), ``eod = eos_token_id``, and ``tokenize`` adds no special tokens, so ``--append-eod`` appends the EOD
exactly as for sentencepiece.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Iterable, Iterator, List, Optional, Sequence

SENTENCEPIECE, HUGGINGFACE = "SentencePieceTokenizer", "HuggingFaceTokenizer"
TOKENIZER_TYPES = (SENTENCEPIECE, HUGGINGFACE)  # Megatron-LM's --tokenizer-type names
# The files a Hugging Face tokenizer directory may hold; the content hash covers those present, in this order.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model")

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
NO_PAD_ID = -1  # Megatron's datasets pad with -1 and mask it out when the tokenizer has no pad id


def check_vocab_fits(tokenizer_vocab: int, model_vocab: int) -> None:
    """Raise ``ValueError`` unless every token id ``< tokenizer_vocab`` fits a model with ``model_vocab`` rows."""
    if tokenizer_vocab > model_vocab:
        raise ValueError(
            f"the tokenizer has {tokenizer_vocab} tokens but the model's vocabulary has only {model_vocab} "
            f"rows, so token ids {model_vocab}..{tokenizer_vocab - 1} would index outside the embedding. "
            f"Fix: raise the model's --vocab-size / padded vocab size to at least {tokenizer_vocab}, or retrain "
            f"the tokenizer with tools/train_tokenizer.py --vocab-size {model_vocab} (or less)."
        )


def iter_documents(path: str, json_keys: Sequence[str] = ("text",)) -> Iterator[str]:
    """Yield the documents of ``path``: one per JSONL line (the ``json_keys`` values) or the whole text file.

    A file is read as JSONL when its name ends in ``.jsonl`` or ``.json``; otherwise it is one plain-text
    document. Blank JSONL lines are skipped. Errors name the file, the line and the fix.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path!r}. Fix: pass an existing text or JSONL file.")
    if not path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()
        return
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = parse_json_line(line, path, line_no)
            for key in json_keys:
                yield json_field(record, key, path, line_no)


def parse_json_line(line: str, path: str, line_no: int) -> dict:
    """``json.loads`` one JSONL line, with an error naming the file and line when it is not a JSON object."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}:{line_no}: malformed JSON ({e.msg} at character {e.pos + 1}): {line[:80]!r}. "
            f"Fix: each line must be one JSON object, e.g. {{\"text\": \"...\"}}."
        ) from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{line_no}: expected a JSON object per line, got {type(record).__name__}. "
                         f"Fix: write one object per line, e.g. {{\"text\": \"...\"}}.")
    return record


def json_field(record: dict, key: str, path: str, line_no: int) -> str:
    """``record[key]`` as a string, with an error naming the key, the keys present and ``--json-keys``."""
    if key not in record:
        raise ValueError(f"{path}:{line_no}: JSON key {key!r} missing; the line has keys {sorted(record)}. "
                       f"Fix: pass the right field name with --json-keys.")
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{path}:{line_no}: JSON key {key!r} holds a {type(value).__name__}, expected a string.")
    return value


def _training_lines(inputs: Sequence[str], json_keys: Sequence[str]) -> Iterator[str]:
    for path in inputs:
        for doc in iter_documents(path, json_keys):
            for line in doc.split("\n"):
                if line.strip():
                    yield line


def train_sentencepiece(
    inputs: Sequence[str],
    output_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    json_keys: Sequence[str] = ("text",),
    seed: int = 1234,
    num_threads: int = 1,
    max_sentence_length: int = 16384,
) -> str:
    """Train a SentencePiece model on ``inputs`` and write ``{output_prefix}.model`` / ``.vocab``.

    ``inputs`` are text files (one document each) or JSONL files (``.jsonl``/``.json``; the ``json_keys``
    fields of each line). Returns the ``.model`` path. Both files are written to a temporary name and then
    renamed, so an interrupted run leaves no half-written model. ``num_threads`` is part of the result
    (BPE merges differ between thread counts), hence a fixed default; 1 thread trains 4 MB in ~1 s (BPE).
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if isinstance(inputs, str):
        inputs = [inputs]
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer training input not found: {path!r}")
    min_vocab = 256 + 3 + 1  # byte pieces + specials + at least one learned piece
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be >= {min_vocab} (256 byte-fallback pieces + 3 specials), "
                         f"got {vocab_size}")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    spm.set_random_generator_seed(seed)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".spm-train-") as tmp:
        tmp_prefix = os.path.join(tmp, "model")
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(list(inputs), json_keys),
            model_prefix=tmp_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=num_threads,
            max_sentence_length=max_sentence_length,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=NO_PAD_ID,
            minloglevel=2,
        )
        for ext in (".vocab", ".model"):  # the .model last: its presence means the pair is complete
            os.replace(tmp_prefix + ext, output_prefix + ext)
    return output_prefix + ".model"


def _file_md5(path: str) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    """A SentencePiece model with the attributes Megatron-core's ``GPTDatasetConfig`` reads.

    ``vocab_size``, ``eod`` (= ``eos``, ``</s>``), ``bos``, ``pad`` (-1: no pad piece), ``unique_identifiers``
    (Megatron hashes it into its dataset cache names; it holds the model file's MD5 so a retrained model
    never reuses stale caches), ``tokenize(text) -> list[int]``, ``detokenize(ids) -> str``, ``model_path``.
    """

    tokenizer_type = SENTENCEPIECE

    def __init__(self, model_path: str):
        import sentencepiece as spm

        check_tokenizer_path(SENTENCEPIECE, model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"tokenizer model not found: {model_path!r}. Fix: train one with "
                f"`python tools/train_tokenizer.py --input FILE --output-prefix PREFIX` and pass PREFIX.model.")
        self.model_path = os.path.abspath(model_path)
        self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        self.unique_identifiers = {"class": "SentencePieceTokenizer", "model_path": self.model_path,
                                   "model_md5": _file_md5(self.model_path)}

    def __getstate__(self):  # the processor itself is not picklable: reload it from the path
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def pad(self) -> int:
        return self._sp.pad_id()

    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def looks_like_hf_tokenizer(path: str) -> bool:
    """A directory or a ``.json`` file: a Hugging Face tokenizer, not a sentencepiece ``.model``."""
    return os.path.isdir(path) or path.endswith(".json")


def check_tokenizer_path(tokenizer_type: str, path: str) -> None:
    """Raise ``ValueError`` naming ``path`` and the fix when it cannot be a tokenizer of ``tokenizer_type``.

    Cheap (no tokenizer is loaded): a Hugging Face directory or ``.json`` passed as a sentencepiece model, a
    Hugging Face path without tokenizer files, and a ``tokenizer.json`` that is not JSON.
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"--tokenizer-type {tokenizer_type!r}: expected one of {', '.join(TOKENIZER_TYPES)}")
    if tokenizer_type == SENTENCEPIECE:
        if looks_like_hf_tokenizer(path):
            raise ValueError(f"--tokenizer-model {path}: this looks like a Hugging Face tokenizer; pass "
                             f"--tokenizer-type HuggingFaceTokenizer (and the directory that holds tokenizer.json), "
                             f"or a sentencepiece .model file")
        return
    if os.path.isfile(path) and os.path.basename(path) == "tokenizer.json":
        path = os.path.dirname(path) or "."
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--tokenizer-model {path}: no such directory. Fix: with --tokenizer-type "
                                f"HuggingFaceTokenizer pass a local directory holding tokenizer.json and "
                                f"tokenizer_config.json (e.g. a model saved with save_pretrained)")
    if not hf_tokenizer_files(path):
        raise ValueError(f"--tokenizer-model {path}: no Hugging Face tokenizer files there (looked for "
                         f"{', '.join(HF_TOKENIZER_FILES)}). Fix: pass the directory that holds tokenizer.json / "
                         f"tokenizer_config.json, e.g. one written by tokenizer.save_pretrained(DIR)")
    tj = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tj):
        try:
            with open(tj, encoding="utf-8") as f:
                json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"--tokenizer-model {path}: {tj} is corrupt (not valid JSON: {e}). Fix: copy the "
                             f"tokenizer files again from the model they belong to") from None


def hf_tokenizer_files(path: str) -> List[str]:
    """The Hugging Face tokenizer files present in directory ``path``, in :data:`HF_TOKENIZER_FILES` order."""
    return [os.path.join(path, n) for n in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(path, n))]


def tokenizer_sha256(path: Optional[str]) -> Optional[str]:
    """SHA-256 of a tokenizer: the file itself, or, for a Hugging Face directory, its tokenizer files (name and
    content, in a fixed order). ``None`` for no path or a path that is not there."""
    if not path:
        return None
    if os.path.isdir(path):
        files = hf_tokenizer_files(path)
        if not files:
            return None
    elif os.path.isfile(path):
        files = [path]
    else:
        return None
    digest = hashlib.sha256()
    for name in files:
        if os.path.isdir(path):  # a single file hashes as itself (what older checkpoints recorded)
            digest.update(os.path.basename(name).encode() + b"\0")
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class HFTokenizer:
    """A local Hugging Face tokenizer with :class:`Tokenizer`'s interface (Megatron-LM's ``_HuggingFaceTokenizer``).

    ``vocab_size`` = ``len(tokenizer)`` (added tokens included); ``eod`` = ``eos`` = ``eos_token_id`` (required:
    documents are separated by it); ``bos`` = ``bos_token_id`` (or ``None``); ``pad`` = ``pad_token_id`` or -1;
    ``tokenize`` adds no special tokens (``add_special_tokens=False``), so no BOS is prepended and ``--append-eod``
    appends the EOD; ``model_path`` is the directory. Loaded with ``local_files_only=True``: never downloads.
    Pickles as its path.
    """

    tokenizer_type = HUGGINGFACE

    def __init__(self, model_path: str):
        check_tokenizer_path(HUGGINGFACE, model_path)
        if os.path.isfile(model_path):  # a tokenizer.json: its directory
            model_path = os.path.dirname(model_path) or "."
        self.model_path = os.path.abspath(model_path)
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds; all mean "cannot load"
            raise ValueError(f"--tokenizer-model {self.model_path}: cannot load it as a Hugging Face tokenizer "
                             f"({type(e).__name__}: {str(e)[:300]}). Fix: pass a directory written by "
                             f"save_pretrained that holds tokenizer.json / tokenizer_config.json") from None
        if self._tok.eos_token_id is None:
            raise ValueError(f"--tokenizer-model {self.model_path}: the tokenizer has no eos token, which Megatron "
                             f"uses as the end-of-document token. Fix: set eos_token in tokenizer_config.json")
        self.unique_identifiers = {"class": HUGGINGFACE, "model_path": self.model_path,
                                   "model_sha256": tokenizer_sha256(self.model_path)}

    def __getstate__(self):
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eod(self) -> int:
        return self._tok.eos_token_id

    @property
    def eos(self) -> int:
        return self._tok.eos_token_id

    @property
    def bos(self) -> Optional[int]:
        return self._tok.bos_token_id

    @property
    def pad(self) -> int:
        return NO_PAD_ID if self._tok.pad_token_id is None else self._tok.pad_token_id

    def tokenize(self, text: str) -> List[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"HFTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def build_tokenizer(tokenizer_type: str, model_path: str):
    """The tokenizer for Megatron-LM's ``--tokenizer-type`` and ``--tokenizer-model``: :class:`Tokenizer`
    (``SentencePieceTokenizer``, a ``.model`` file) or :class:`HFTokenizer` (``HuggingFaceTokenizer``, a local
    directory). Errors name the path and the fix (see :func:`check_tokenizer_path`)."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"--tokenizer-type {tokenizer_type!r}: expected one of {', '.join(TOKENIZER_TYPES)}")
    return HFTokenizer(model_path) if tokenizer_type == HUGGINGFACE else Tokenizer(model_path)  # each checks the path
