"""Logging of the regularizer values, like Megatron's MoE aux-loss tracker.

Each micro-batch records its (already TP/CP-reduced) value per name; the
trainer calls :func:`report` once per step: values are averaged over the
step's micro-batches, summed over pipeline stages (JREG is split across
stages, SimReg lives on the last one) and averaged over data-parallel ranks.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist

_VALUES: Dict[str, List[torch.Tensor]] = {}


def record(name: str, value: torch.Tensor) -> None:
    _VALUES.setdefault(name, []).append(value.detach().float().reshape(()))


def clear() -> None:
    _VALUES.clear()


def report(names=("simreg", "jreg"), *, pp_group: Optional[dist.ProcessGroup] = None,
           dp_group: Optional[dist.ProcessGroup] = None) -> Dict[str, float]:
    """Per-step values ``{name: float}`` and reset. Every rank must call it (collectives)."""
    local = torch.stack([torch.stack(_VALUES[n]).mean() if _VALUES.get(n) else torch.zeros(()) for n in names])
    if dist.is_available() and dist.is_initialized():
        if pp_group is not None and dist.get_world_size(pp_group) > 1:
            dist.all_reduce(local, group=pp_group)
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(local, group=dp_group)
            local /= dist.get_world_size(dp_group)
    clear()
    return {n: v for n, v in zip(names, local.tolist())}
