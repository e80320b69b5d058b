"""Logging of the regularizer values, like Megatron's MoE aux-loss tracker.

Each micro-batch records this rank's share of its value per name, as a sum
and a count; the trainer calls :func:`report` once per step. Shares are added
up over the groups that split a sequence (TP under SP, CP) in one collective
per name and step, not one per micro-batch; each micro-batch's value
``sum / count`` is averaged over the step's micro-batches, summed over
pipeline stages (JREG is split across stages, SimReg lives on the last one)
and averaged over data-parallel ranks.

Memory stays bounded when nobody calls :func:`report` (any driver but ours):
records go to ``M`` slots per name (``M`` micro-batches per step), the
``k``-th record since the last report adding its sum and count to slot
``k mod M``. Reported every step, each slot holds one micro-batch, as before.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..parallel.comm import comm_device
from .step import STEP

_SHARES: Dict[str, List[torch.Tensor]] = {}  # name -> one [sum, count] per micro-batch slot
_RECORDS: Dict[str, int] = {}  # name -> records since the last report
_GROUPS: Dict[str, Sequence[dist.ProcessGroup]] = {}


def record(name: str, total: torch.Tensor, count: torch.Tensor, groups: Sequence[dist.ProcessGroup] = ()) -> None:
    """Record one micro-batch: this rank's share of the sum and count; ``groups`` hold the other shares."""
    share = torch.stack([total.detach().float(), count.detach().float()])
    slots = _SHARES.setdefault(name, [])
    k = _RECORDS.get(name, 0)
    _RECORDS[name] = k + 1
    if k < STEP.num_microbatches:
        slots.append(share)
    else:  # nobody reported last step: fold into an earlier micro-batch's slot
        slots[k % len(slots)] += share
    _GROUPS[name] = tuple(groups)


def clear() -> None:
    _SHARES.clear()
    _RECORDS.clear()
    _GROUPS.clear()


def report(names=("simreg", "jreg"), *, pp_group: Optional[dist.ProcessGroup] = None,
           dp_group: Optional[dist.ProcessGroup] = None) -> Dict[str, float]:
    """Per-step values ``{name: float}`` and reset. Every rank must call it (collectives)."""
    device = comm_device()
    values = []
    for name in names:  # ranks sharing a sequence run the same stage: they record the same names
        if not _SHARES.get(name):
            values.append(torch.zeros((), device=device))
            continue
        shares = torch.stack(_SHARES[name]).to(device)  # [micro-batches, 2]
        for group in _GROUPS[name]:
            dist.all_reduce(shares, group=group)
        values.append((shares[:, 0] / shares[:, 1].clamp_min(1)).mean())
    local = torch.stack(values)
    if dist.is_available() and dist.is_initialized():
        if pp_group is not None and dist.get_world_size(pp_group) > 1:
            dist.all_reduce(local, group=pp_group)
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(local, group=dp_group)
            local /= dist.get_world_size(dp_group)
    clear()
    return {n: v for n, v in zip(names, local.tolist())}
