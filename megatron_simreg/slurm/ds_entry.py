"""Entry script for DeepSpeed's ``--launcher slurm``: srun tasks -> torch.distributed variables.

DeepSpeed's SLURM runner starts ``python -u THIS_FILE ARGS`` as one srun task
per process and sets no ``RANK``; the trainer runs in-process only when
``RANK`` is set. Map SLURM's task variables, then run ``megatron-simreg ARGS``.
"""

import os
import sys


def _slurm_to_torch_env(env=os.environ) -> None:
    if "RANK" in env or "SLURM_PROCID" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")


if __name__ == "__main__":
    _slurm_to_torch_env()
    from megatron_simreg.cli import main

    sys.exit(main(sys.argv[1:]))
