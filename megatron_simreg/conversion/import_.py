"""``import-hf``: a ``transformers`` Llama/Mixtral directory -> one of our checkpoints (Megatron backend).

The checkpoint holds model weights only (no optimizer state): continue with
``megatron-simreg train --load CKPT --no-load-optim`` and the same model and
layout flags (``meta.json``'s ``model`` lists them).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from ..training import checkpoint as ckpt
from .hf_side import megatron_settings_from_hf
from .layout import ConversionError, hf_to_megatron, split_pp, split_tp

_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def _with_extra_state(sd):
    """The ``_extra_state`` entries Megatron's linears carry in their state dicts (``None`` for the local spec)."""
    out = dict(sd)
    for k in sd:
        parts = k.rsplit(".", 2)
        if k.endswith(".weight") and len(parts) == 3 and parts[1] in _LINEARS:
            out[f"{parts[0]}.{parts[1]}._extra_state"] = None
    if any(k.startswith("decoder.final_layernorm") for k in sd):
        out["output_layer._extra_state"] = None
    return out


def import_hf(hf_dir: str, save: str, tp: int = 1, pp: int = 1, dp: int = 1, make_vocab_size_divisible_by: int = 128,
              seq_length: Optional[int] = None, seed: int = 1234, verify: bool = False, log=print):
    """Write checkpoint iteration 0 under ``save``; returns the :class:`~.verify.Parity` with ``verify``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ConversionError(f"--hf {hf_dir}: no config.json there; not a transformers model directory")
    cfg = AutoConfig.from_pretrained(hf_dir)
    settings = megatron_settings_from_hf(cfg, tp, pp, dp, make_vocab_size_divisible_by, seq_length)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    hf_state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    full = hf_to_megatron(hf_state, settings)
    tied = not settings["untie_embeddings_and_output_weights"]

    final = ckpt.iteration_dir(save, 0)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    stages = split_pp(full, pp, settings["num_layers"], tied)
    ranks = []
    for p, stage in enumerate(stages):
        shards = split_tp(stage, tp, swiglu=True)
        for d in range(dp):
            for t, shard in enumerate(shards):
                rank = t + tp * d + tp * dp * p  # Megatron's default order tp-cp-ep-dp-pp
                ranks.append({"rank": rank, "tp": t, "pp": p, "cp": 0, "dp": d})
                torch.save({"model": _with_extra_state(shard)}, os.path.join(tmp, f"rank_{rank:05d}.pt"))
    sp_model = os.path.join(hf_dir, "tokenizer.model")
    meta = {"iteration": 0, "model": settings, "backend": "megatron", "ranks": sorted(ranks, key=lambda r: r["rank"]),
            "tokenizer_model": os.path.abspath(sp_model) if os.path.isfile(sp_model) else None,
            "imported_from": os.path.abspath(hf_dir), "hf_vocab_size": cfg.vocab_size,
            "args": {"seed": seed}}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    with open(os.path.join(save, ckpt.POINTER + ".tmp"), "w") as f:
        f.write("0")
    os.replace(os.path.join(save, ckpt.POINTER + ".tmp"), os.path.join(save, ckpt.POINTER))
    log(f"imported {hf_dir} ({type(hf_model).__name__}) to {final}: TP={tp} PP={pp} DP={dp}, padded vocab "
        f"{settings['padded_vocab_size']}. Continue with: megatron-simreg train --load {save} --no-load-optim "
        f"(+ the model flags in meta.json)")
    if not verify:
        return None
    from .megatron_side import load_megatron_checkpoint
    from .verify import compare

    # read back what was written (exercises the TP/PP merge of the files themselves)
    merged, _, _ = load_megatron_checkpoint(save, 0)
    parity = compare(settings, merged, hf_model, cfg.vocab_size)
    log(str(parity))
    return parity
