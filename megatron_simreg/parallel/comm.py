"""The device for small collectives (logged sums, counts, flags).

NCCL reduces CUDA tensors only: a CPU tensor handed to ``all_reduce`` over an
NCCL group raises, so host-side values travel on the current CUDA device
there, and stay on the CPU under gloo.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def comm_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """The current CUDA device if ``group`` (default: the world) uses NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
