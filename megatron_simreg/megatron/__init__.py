"""The Megatron-core integration: the GPTModel patch, step scaling, logging, CPU adaptations.

Importing this package imports megatron-core; :mod:`megatron_simreg` itself
does not, so the losses stay usable without it.
"""

from ..parallel.simreg_parallel import count_step_anchors
from .patch import apply_to_megatron, is_patched, undo_megatron_patch
from .step import begin_step, end_step
from .tracker import report as report_losses

__all__ = [
    "apply_to_megatron", "undo_megatron_patch", "is_patched",
    "begin_step", "end_step", "count_step_anchors", "report_losses",
]
