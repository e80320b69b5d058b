"""The two regularizers in plain PyTorch (no Megatron import)."""

from .jreg import jreg_penalty, jump_strength, layer_angular_distances, layer_distance_sums, layer_weights
from .simreg import SimRegTerms, document_ids, simreg_loss, simreg_per_token, simreg_terms

__all__ = [
    "SimRegTerms", "document_ids", "simreg_loss", "simreg_per_token", "simreg_terms",
    "jreg_penalty", "jump_strength", "layer_angular_distances", "layer_distance_sums", "layer_weights",
]
