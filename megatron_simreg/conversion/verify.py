"""Parity check: the Megatron model and the ``transformers`` model on the same tokens (fp32)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .megatron_side import SingleProcessMegatron, build_megatron_model, megatron_logits

TOLERANCE = 1e-4  # fp32 max |delta logit|


@dataclass
class Parity:
    max_abs_logit_diff: float
    megatron_loss: float
    hf_loss: float
    tolerance: float = TOLERANCE
    tokenizer_checked: bool = False  # export-hf: the exported tokenizer against the training one
    tokenizer_error: Optional[str] = None

    @property
    def loss_diff(self) -> float:
        return abs(self.megatron_loss - self.hf_loss)

    @property
    def ok(self) -> bool:
        return self.max_abs_logit_diff <= self.tolerance and self.tokenizer_error is None

    def __str__(self) -> str:
        return (f"parity: max |dlogit| = {self.max_abs_logit_diff:.3e} (tolerance {self.tolerance:.0e}), "
                f"loss megatron {self.megatron_loss:.6f} hf {self.hf_loss:.6f} (|dloss| = {self.loss_diff:.3e})"
                + (f"; tokenizer: {self.tokenizer_error or 'same ids'}" if self.tokenizer_checked else "")
                + f" -> {'OK' if self.ok else 'FAILED'}")


def verification_tokens(vocab_size: int, seq_length: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, min(seq_length, 64)), generator=g)


def _loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                                 tokens[:, 1:].reshape(-1)))


def load_hf_model(hf_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def compare(megatron_settings: dict, megatron_state: Dict[str, torch.Tensor], hf_model, vocab_size: int) -> Parity:
    """Run both models on the same random tokens (ids below the real vocabulary size)."""
    tokens = verification_tokens(vocab_size, megatron_settings.get("seq_length")
                                 or megatron_settings["max_position_embeddings"])
    with SingleProcessMegatron():
        gpt = build_megatron_model(megatron_settings, megatron_state)
        ml = megatron_logits(gpt, tokens)[..., :vocab_size]
        del gpt
    hl = hf_model(input_ids=tokens).logits.float()
    if ml.shape != hl.shape:
        return Parity(float("inf"), _loss(ml, tokens), float("nan"))
    return Parity(float((ml - hl).abs().max()), _loss(ml, tokens), _loss(hl, tokens))
