"""``export-hf``: one of our checkpoints (either backend, any TP/PP) -> a ``transformers`` directory."""

from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import torch

from .hf_side import copy_hf_tokenizer, hf_config, write_safetensors, write_tokenizer
from .layout import ConversionError, megatron_to_hf
from .megatron_side import load_megatron_checkpoint
from .staging import discard, publish, staging_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export_hf(load: str, out: str, iteration: Optional[int] = None, dtype: str = "fp32", verify: bool = False,
              tokenizer_model: Optional[str] = None, log=print):
    """Write ``out``; returns the :class:`~.verify.Parity` when ``verify`` else ``None``.

    The model is written next to ``out`` and moved there only once complete and, with ``verify``, once it has
    passed the parity check; a failed check leaves ``out`` as it was.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype}: use one of {sorted(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    full, meta, directory = load_megatron_checkpoint(load, iteration)
    model = meta["model"]
    tmp = staging_dir(out)
    try:
        cfg, vocab, reference = _write_hf(tmp, full, meta, torch_dtype, tokenizer_model)
        parity = _verify(tmp, full, model, torch_dtype, vocab, reference, log) if verify else None
        if parity is not None and not parity.ok:
            log(f"export-hf: the parity check failed; nothing was written to {out}")
            return parity
        publish(tmp, out, merge=True)
    finally:
        discard(tmp)  # a no-op once published
    log(f"exported {directory} ({cfg.architectures[0]}, {model['num_layers']} layers, TP={model['tensor_model_parallel_size']}"
        f" PP={model['pipeline_model_parallel_size']}, {meta.get('backend', 'megatron')} backend) to {out} [{dtype}]")
    return parity


def _is_hf_tokenizer_dir(path: Optional[str]) -> bool:
    """A directory AutoTokenizer can load by itself (a ``tokenizer.json`` or a ``tokenizer_config.json``)."""
    return bool(path) and os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json"))


def _tokenizer_kind(path: str) -> str:
    from ..data.tokenizer import HUGGINGFACE, SENTENCEPIECE, looks_like_hf_tokenizer

    return HUGGINGFACE if looks_like_hf_tokenizer(path) else SENTENCEPIECE


def _hf_dir(path: str) -> str:
    return (os.path.dirname(path) or ".") if os.path.isfile(path) and path.endswith(".json") else path


def resolve_tokenizer(meta: dict, tokenizer_model: Optional[str]):
    """``(source, reference)``: the tokenizer to write into the export and the one training used (what
    ``--verify`` compares it with), each ``(tokenizer_type, path)`` or ``None``.

    ``--tokenizer-model`` wins; an import-hf checkpoint whose source directory still holds Hugging Face tokenizer
    files gets those copied through; otherwise the tokenizer ``meta.json`` records (``tokenizer_type`` /
    ``tokenizer_model``)."""
    from ..data.tokenizer import HUGGINGFACE

    if tokenizer_model:
        if not os.path.exists(tokenizer_model):
            return None, None
        kind = _tokenizer_kind(tokenizer_model)
        path = _hf_dir(tokenizer_model) if kind == HUGGINGFACE else tokenizer_model
        return (kind, path), (kind, path)
    recorded = meta.get("tokenizer_model")
    reference = None
    if recorded and os.path.exists(recorded):
        kind = meta.get("tokenizer_type") or _tokenizer_kind(recorded)
        reference = (kind, _hf_dir(recorded) if kind == HUGGINGFACE else recorded)
    source_dir = meta.get("imported_from")
    if _is_hf_tokenizer_dir(source_dir):
        source = (HUGGINGFACE, source_dir)
        return source, reference or source
    return reference, reference


class _TokenizerInfo:
    """What the export needs of a tokenizer: the rows its ids can index, its special ids, its ``encode``."""

    def __init__(self, kind: str, path: str):
        from ..data.tokenizer import SENTENCEPIECE

        self.kind, self.path = kind, path
        if kind == SENTENCEPIECE:
            import sentencepiece as spm

            try:
                sp = spm.SentencePieceProcessor(model_file=path)
            except (OSError, RuntimeError) as e:
                raise ConversionError(f"tokenizer model {path}: cannot load it with sentencepiece ({e})") from e
            self.vocab_size = self.rows = sp.vocab_size()
            self.special_ids = {f"{name}_token_id": (i if i >= 0 else None)
                                for name, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id()))}
            self.encode = sp.encode
        else:
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except Exception as e:  # noqa: BLE001 - transformers raises many kinds; all mean "cannot load"
                raise ConversionError(f"tokenizer {path}: cannot load it as a Hugging Face tokenizer "
                                      f"({type(e).__name__}: {str(e)[:300]})") from None
            self.vocab_size = len(tok)
            self.rows = max(len(tok), max(tok.get_vocab().values(), default=-1) + 1)
            self.special_ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                "pad_token_id": tok.pad_token_id}
            self.encode = lambda text: list(tok(text, add_special_tokens=False)["input_ids"])


def _source_config_ids(meta: dict) -> Optional[dict]:
    """bos/eos/pad ids of an import-hf checkpoint's source ``config.json`` (what went in), if it is still there."""
    src = meta.get("imported_from")
    path = os.path.join(src, "config.json") if src else None
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    ids = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    return ids or None


def _write_hf(out: str, full: dict, meta: dict, torch_dtype, tokenizer_model: Optional[str]):
    """Write the config, weights, generation config and (when there is one) tokenizer; returns
    ``(cfg, vocab, reference)`` (``reference``: the training tokenizer, a :class:`_TokenizerInfo`, or ``None``)."""
    from ..data.tokenizer import SENTENCEPIECE

    model = meta["model"]
    padded = model["padded_vocab_size"]
    source, reference = resolve_tokenizer(meta, tokenizer_model)
    special_ids = None
    if source is not None:
        info = _TokenizerInfo(*source)
        if info.rows > padded:
            raise ConversionError(f"the tokenizer has {info.rows} tokens but the model only {padded} rows")
        if source[0] == SENTENCEPIECE:
            write_tokenizer(source[1], out)
        else:
            copy_hf_tokenizer(source[1], out)
        # an import-hf checkpoint keeps its HF vocabulary (rows past the tokenizer's included)
        vocab = meta.get("hf_vocab_size") or info.rows
        if vocab < info.rows:
            raise ConversionError(f"the HF vocab_size would be {vocab} but the tokenizer ({source[1]}) has "
                                  f"{info.rows} tokens: ids {vocab}..{info.rows - 1} would have no embedding row")
        special_ids = info.special_ids
        reference = _TokenizerInfo(*reference) if reference != source else info
    elif meta.get("hf_vocab_size"):  # imported from HF without a tokenizer
        vocab = meta["hf_vocab_size"]
    else:
        vocab = padded
        warnings.warn(f"the tokenizer model {tokenizer_model or meta.get('tokenizer_model')!r} recorded in the "
                      f"checkpoint is not there: no tokenizer is written and the HF vocabulary keeps Megatron's "
                      f"padded size {vocab} (pass --tokenizer-model)")
    if vocab > padded:
        raise ConversionError(f"the tokenizer has {vocab} tokens but the model only {padded} rows")
    if not tokenizer_model:  # an import gives back its source config's special ids
        special_ids = _source_config_ids(meta) or special_ids
    hf_state = {k: v.to(torch_dtype) for k, v in megatron_to_hf(full, model, vocab).items()}
    cfg = hf_config(model, vocab, torch_dtype, special_ids)
    cfg.save_pretrained(out)
    write_safetensors(hf_state, out)
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                     pad_token_id=cfg.eos_token_id if cfg.pad_token_id is None else cfg.pad_token_id
                     ).save_pretrained(out)
    return cfg, vocab, reference if source is not None else None


TOKENIZER_SAMPLES = ("def main(args):\n    return 0\n", "  import os, sys  # 2024\n\n\tx = 'h\u00e9llo \u2713'",
                     "a  b   c\n", "The quick brown fox jumps over the lazy dog. 12345",
                     "\u65e5\u672c\u8a9e \U0001F600")


def check_exported_tokenizer(out: str, reference) -> Optional[str]:
    """``None`` when the tokenizer AutoTokenizer loads from ``out`` gives ``reference``'s ids (and vocabulary
    size); else what differs."""
    from transformers import AutoTokenizer

    from ..data.tokenizer import build_tokenizer

    try:
        auto = AutoTokenizer.from_pretrained(out, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        return f"AutoTokenizer cannot load the exported tokenizer ({type(e).__name__}: {str(e)[:200]})"
    try:  # the training tokenizer as the trainer builds it
        trained = build_tokenizer(reference.kind, reference.path)
        vocab_size, encode = trained.vocab_size, trained.tokenize
    except (ValueError, OSError):  # e.g. an imported HF tokenizer without an eos token
        vocab_size, encode = reference.vocab_size, reference.encode
    if len(auto) != vocab_size:
        return f"the exported tokenizer has {len(auto)} tokens, the training tokenizer {vocab_size}"
    for text in TOKENIZER_SAMPLES:
        got, want = auto(text, add_special_tokens=False)["input_ids"], list(encode(text))
        if got != want:
            return f"the exported tokenizer encodes {text!r} as {got[:12]}..., the training tokenizer as {want[:12]}..."
    return None


def _verify(out: str, full: dict, model: dict, torch_dtype, vocab: int, reference, log):
    """Compare the written HF model with the checkpoint's weights and the written tokenizer with the training one."""
    from .verify import compare, load_hf_model

    # The Megatron side runs the exported precision's values in fp32, so any difference is the mapping's.
    rounded = {k: v.to(torch_dtype).float() for k, v in full.items()}
    parity = compare(model, rounded, load_hf_model(out), vocab)
    if reference is not None:
        parity.tokenizer_error = check_exported_tokenizer(out, reference) or None
        parity.tokenizer_checked = True
    log(str(parity))
    return parity
