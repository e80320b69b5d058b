"""megatron-simreg: SimReg and JREG regularizers for Megatron-core pretraining.

The losses (:mod:`megatron_simreg.losses`) are plain PyTorch; the Megatron-core
integration lives in :mod:`megatron_simreg.megatron` and is imported only when
asked for.
"""

from .config import JRegConfig, SimRegConfig
from .losses import (
    SimRegTerms,
    document_ids,
    jreg_penalty,
    jump_strength,
    layer_angular_distances,
    layer_distance_sums,
    layer_weights,
    simreg_loss,
    simreg_per_token,
    simreg_terms,
)

__version__ = "0.1.0"

_MEGATRON_NAMES = ("apply_to_megatron", "undo_megatron_patch")


def __getattr__(name):
    # The Megatron patch imports megatron-core; load it only when asked for.
    if name in _MEGATRON_NAMES:
        from . import megatron

        return getattr(megatron, name)
    raise AttributeError(f"module 'megatron_simreg' has no attribute {name!r}")

__all__ = [
    "apply_to_megatron", "undo_megatron_patch",
    "JRegConfig", "SimRegConfig", "SimRegTerms", "document_ids",
    "jreg_penalty", "jump_strength", "layer_angular_distances", "layer_distance_sums", "layer_weights",
    "simreg_loss", "simreg_per_token", "simreg_terms",
]
