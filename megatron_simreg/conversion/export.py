"""``export-hf``: one of our checkpoints (either backend, any TP/PP) -> a ``transformers`` directory."""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from .hf_side import hf_config, write_safetensors, write_tokenizer
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
        cfg, vocab = _write_hf(tmp, full, meta, torch_dtype, tokenizer_model)
        parity = _verify(tmp, full, model, torch_dtype, vocab, log) if verify else None
        if parity is not None and not parity.ok:
            log(f"export-hf: the parity check failed; nothing was written to {out}")
            return parity
        publish(tmp, out, merge=True)
    finally:
        discard(tmp)  # a no-op once published
    log(f"exported {directory} ({cfg.architectures[0]}, {model['num_layers']} layers, TP={model['tensor_model_parallel_size']}"
        f" PP={model['pipeline_model_parallel_size']}, {meta.get('backend', 'megatron')} backend) to {out} [{dtype}]")
    return parity


def _write_hf(out: str, full: dict, meta: dict, torch_dtype, tokenizer_model: Optional[str]):
    """Write the config, weights, generation config and (when there is one) tokenizer; returns ``(cfg, vocab)``."""
    model = meta["model"]
    sp_model = tokenizer_model or meta.get("tokenizer_model")
    if sp_model and os.path.isfile(sp_model):
        vocab = write_tokenizer(sp_model, out)
    elif meta.get("hf_vocab_size"):  # imported from HF without a sentencepiece model
        vocab = meta["hf_vocab_size"]
    else:
        vocab = model["padded_vocab_size"]
        warnings.warn(f"the tokenizer model {sp_model!r} recorded in the checkpoint is not there: no tokenizer is "
                      f"written and the HF vocabulary keeps Megatron's padded size {vocab} (pass --tokenizer-model)")
    if vocab > model["padded_vocab_size"]:
        raise ConversionError(f"the tokenizer has {vocab} tokens but the model only {model['padded_vocab_size']} rows")
    hf_state = {k: v.to(torch_dtype) for k, v in megatron_to_hf(full, model, vocab).items()}
    cfg = hf_config(model, vocab, torch_dtype)
    cfg.save_pretrained(out)
    write_safetensors(hf_state, out)
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                     pad_token_id=cfg.eos_token_id).save_pretrained(out)
    return cfg, vocab


def _verify(out: str, full: dict, model: dict, torch_dtype, vocab: int, log):
    """Compare the written HF model with the checkpoint's weights."""
    from .verify import compare, load_hf_model

    # The Megatron side runs the exported precision's values in fp32, so any difference is the mapping's.
    rounded = {k: v.to(torch_dtype).float() for k, v in full.items()}
    parity = compare(model, rounded, load_hf_model(out), vocab)
    log(str(parity))
    return parity
