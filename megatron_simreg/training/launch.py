"""Starting the trainer: in-process under a launcher, or N local processes.

Under torchrun, srun or the deepspeed launcher ``RANK`` is set and the trainer
runs in this process. Otherwise ``--nproc-per-node N`` starts N processes on
this machine (gloo on CPU) with the usual environment variables.
"""

from __future__ import annotations

import os
import sys

from ..parallel.process import free_port


def _child(rank: int, world: int, port: int, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from .args import parse_train_args
    from .trainer import run

    run(parse_train_args(argv))


def launch(args, argv) -> int:
    """Run training for parsed ``args`` (``argv`` re-parsed in children)."""
    from .checkpoint import CheckpointError
    from .trainer import TrainingStopped, run

    n = args.nproc_per_node
    try:
        if n and n > 1 and "RANK" not in os.environ:
            import torch.multiprocessing as mp

            if not os.environ.get("OMP_NUM_THREADS"):
                os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
            mp.start_processes(_child, args=(n, free_port(), argv), nprocs=n, start_method="spawn", join=True)
        else:
            run(args)
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, CheckpointError) as e:  # bad input: the message says what to fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # torch.multiprocessing wraps child errors; show the child's message
        msg = str(e)
        if "TrainingStopped" in msg:
            print(f"error: {msg.strip().splitlines()[-1]}", file=sys.stderr)
            return 3
        raise
    return 0
