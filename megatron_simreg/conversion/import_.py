"""``import-hf``: a ``transformers`` model directory (``hf_side.ACCEPTED_MODEL_TYPES``) -> one of our checkpoints (Megatron backend).

The checkpoint is a dist_checkpointing one holding model weights only (no
optimizer state, no RNG): continue with ``megatron-simreg train --load CKPT
--no-load-optim`` and the same model flags (``meta.json``'s ``model`` lists
them), at any TP/PP/DP layout.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import torch

from ..training import checkpoint as ckpt
from .hf_side import megatron_settings_from_hf
from .layout import ConversionError, hf_to_megatron
from .staging import check_new_directory, discard, publish, staging_dir

if TYPE_CHECKING:
    from .verify import Parity


class _ModelOnly:
    """What :func:`~..training.checkpoint.save` asks of a backend, for a model without an optimizer."""

    def __init__(self, gpt):
        self.gpt = gpt

    def write_checkpoint(self, directory: str, iteration: int) -> None:
        from .megatron_side import save_dist_checkpoint

        save_dist_checkpoint(self.gpt, directory)


def import_hf(hf_dir: str, save: str, tp: int = 1, pp: int = 1, make_vocab_size_divisible_by: Optional[int] = None,
              seq_length: Optional[int] = None, seed: int = 1234, verify: bool = False, log=print):
    """Write checkpoint iteration 0 under ``save``; returns the :class:`~.verify.Parity` with ``verify``.

    The vocabulary keeps the HF model's rows, rounded up to a multiple of ``tp`` (of
    ``make_vocab_size_divisible_by * tp`` when given); ``tp`` and ``pp`` are the layout recorded in
    ``meta.json``, and any layout whose TP divides the rows can load the checkpoint. ``save`` must be empty
    or missing (an import never replaces a checkpoint); it appears only once the checkpoint is complete and,
    with ``verify``, has passed the parity check.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..analysis.hf_probe import weights_error
    from ..training.model_setup import model_flags

    for flag, value in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                        ("--make-vocab-size-divisible-by", 1 if make_vocab_size_divisible_by is None
                                                          else make_vocab_size_divisible_by)):
        if value < 1:
            raise ConversionError(f"{flag} must be >= 1, got {value}")
    if seq_length is not None and seq_length < 1:
        raise ConversionError(f"--seq-length must be >= 1, got {seq_length}")
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"--hf {hf_dir}: the directory does not exist; pass a local transformers model "
                              "directory (config.json and weights)")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ConversionError(f"--hf {hf_dir}: no config.json there; not a transformers model directory")
    check_new_directory(save, "--save")
    try:
        cfg = AutoConfig.from_pretrained(hf_dir)
    except (ValueError, OSError, KeyError) as e:
        raise ConversionError(f"--hf {hf_dir}: config.json cannot be read by transformers "
                              f"({(str(e).strip().splitlines() or [''])[0][:300]})") from e
    settings = megatron_settings_from_hf(cfg, tp, pp, 1, make_vocab_size_divisible_by, seq_length)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError is no OSError
        why = weights_error(hf_dir, e)
        if why is None:
            raise
        raise ConversionError(f"--hf {hf_dir}: {why}") from e
    hf_state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    full = hf_to_megatron(hf_state, settings)

    meta = {"model": settings, "backend": "megatron", **_tokenizer_record(hf_dir),
            "imported_from": os.path.abspath(hf_dir), "hf_vocab_size": cfg.vocab_size,
            "args": {"seed": seed, "make_vocab_size_divisible_by": make_vocab_size_divisible_by or 1}}
    tmp = staging_dir(save)
    try:
        parity = _write_and_verify(tmp, settings, full, meta, hf_model, cfg.vocab_size, verify, log)
        if parity is not None and not parity.ok:
            log(f"import-hf: the parity check failed; nothing was written to {save}")
            return parity
        publish(tmp, save)
    finally:
        discard(tmp)  # a no-op once published
    flags = model_flags(settings) + (f" --seq-length {settings['seq_length']}" if settings.get("seq_length") else "")
    rows = settings["padded_vocab_size"]
    padding = (f"; rows {cfg.vocab_size}..{rows - 1} are zero padding, whose logits (0) join the softmax"
               if rows > cfg.vocab_size else "")
    log(f"imported {hf_dir} ({type(hf_model).__name__}) to {ckpt.iteration_dir(save, 0)}: vocabulary {rows} rows "
        f"(the training tokenizer must have at most that many tokens){padding}.\n"
        f"model flags recorded: {flags}\n"
        f"continue with: megatron-simreg train --load {save} --use-checkpoint-args --no-load-optim [--seq-length N "
        f"...] (or pass the model flags above instead of --use-checkpoint-args)")
    return parity


def _tokenizer_record(hf_dir: str) -> dict:
    """meta.json's ``tokenizer_model`` / ``tokenizer_type`` for the source directory's tokenizer (export-hf copies
    its files through): its sentencepiece ``tokenizer.model`` when there is one (as before), else the directory
    itself when it holds a ``tokenizer.json``; ``None`` when it has no tokenizer."""
    from ..data.tokenizer import HUGGINGFACE, SENTENCEPIECE

    sp_model = os.path.join(hf_dir, "tokenizer.model")
    if os.path.isfile(sp_model):
        return {"tokenizer_model": os.path.abspath(sp_model), "tokenizer_type": SENTENCEPIECE}
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        return {"tokenizer_model": os.path.abspath(hf_dir), "tokenizer_type": HUGGINGFACE}
    return {"tokenizer_model": None}


def _write_and_verify(tmp: str, settings: dict, full: dict, meta: dict, hf_model, vocab_size: int, verify: bool,
                      log) -> Optional[Parity]:
    """Write the checkpoint under ``tmp``; with ``verify``, read it back and compare it with ``hf_model``."""
    from .megatron_side import SingleProcessMegatron, build_megatron_model

    with SingleProcessMegatron():
        ckpt.save(tmp, 0, meta, _ModelOnly(build_megatron_model(settings, full)))
    if not verify:
        return None
    from .megatron_side import load_megatron_checkpoint
    from .verify import compare

    # read back what was written (through dist_checkpointing, as export-hf and the trainer read it)
    merged, _, _ = load_megatron_checkpoint(tmp, 0)
    parity = compare(settings, merged, hf_model, vocab_size)
    log(str(parity))
    return parity
