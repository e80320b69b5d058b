"""SIGUSR1 (SLURM's warning before preemption) and SIGTERM: checkpoint at the next step boundary, then exit."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..parallel.comm import comm_device

_SIGNALLED = {"flag": False}


def install_signal_handlers() -> None:
    """Record SIGUSR1 and SIGTERM instead of dying: the loop stops at the next step boundary."""
    import signal

    def handler(signum, frame):
        _SIGNALLED["flag"] = True

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, handler)


def signal_received() -> bool:
    """Whether any rank got a stop signal: ranks must agree on the iteration they stop at."""
    flag = torch.tensor([1.0 if _SIGNALLED["flag"] else 0.0], device=comm_device())
    if dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
