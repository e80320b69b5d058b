"""Atomic, resumable checkpoints.

Layout (the pointer file keeps Megatron-LM's name)::

    <save>/latest_checkpointed_iteration.txt     "12"
    <save>/iter_0000012/meta.json                iteration, consumed samples, model config, layout
    <save>/iter_0000012/rank_00003.pt            this rank's state (Megatron backend)
    <save>/iter_0000012/deepspeed/...            DeepSpeed engine files (DeepSpeed backend)
    <save>/iter_0000012/rng_00003.pt             this rank's RNG states (both backends)

A save writes everything into ``iter_XXXXXXX.tmp``, renames it once every rank
has finished, and only then rewrites the pointer (through a temporary file
and ``os.replace``). A crash at any point leaves the previous checkpoint and
pointer intact; a stale ``.tmp`` directory is ignored and replaced by the
next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

POINTER = "latest_checkpointed_iteration.txt"
# Test hook: set to an iteration number to crash that save after this rank's
# files are written, before the rename (tests/test_training.py).
CRASH_ENV = "MEGATRON_SIMREG_CRASH_IN_SAVE"


class CheckpointError(RuntimeError):
    pass


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> Dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save(root: str, iteration: int, meta: Dict[str, Any], write_rank_files) -> str:
    """Write checkpoint ``iteration`` atomically; every rank calls this.

    ``write_rank_files(tmp_dir)`` writes this rank's files into ``tmp_dir``
    (a collective for the DeepSpeed engine). Returns the final directory.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        os.makedirs(tmp)
    _barrier()
    write_rank_files(tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rng_{rank:05d}.pt"))
    if os.environ.get(CRASH_ENV) == str(iteration):
        raise RuntimeError(f"crash injected into the save of iteration {iteration} ({CRASH_ENV})")
    _barrier()
    if rank == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        if os.path.exists(final):  # re-saving an iteration: move the old copy aside first
            shutil.rmtree(final + ".old", ignore_errors=True)
            os.rename(final, final + ".old")
        os.rename(tmp, final)
        pointer_tmp = os.path.join(root, POINTER + ".tmp")
        with open(pointer_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, os.path.join(root, POINTER))
        shutil.rmtree(final + ".old", ignore_errors=True)
    _barrier()
    return final


def find(root: str) -> Optional[int]:
    """The iteration the pointer names, ``None`` when ``root`` holds no checkpoint."""
    pointer = os.path.join(root, POINTER)
    if not os.path.isfile(pointer):
        return None
    text = open(pointer).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{pointer} is corrupt (holds {text[:40]!r}, expected an iteration number); "
                              f"fix it to name one of the iter_* directories in {root}")
    return int(text)


def load_meta(root: str, iteration: int) -> Dict[str, Any]:
    path = os.path.join(iteration_dir(root, iteration), "meta.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {iteration_dir(root, iteration)} is missing or corrupt ({e}); "
                              "point --load at another checkpoint directory") from e


def load_rank_file(path: str) -> Dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e}); the checkpoint is corrupt or "
                              "incomplete: point --load at another checkpoint") from e


def check_compatible(saved: Dict[str, Any], current: Dict[str, Any], where: str) -> None:
    """Fail, listing every differing field, when the model or layout differs."""
    keys = sorted(set(saved) | set(current))
    diff = [f"  {k}: checkpoint={saved.get(k)!r} run={current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    if diff:
        raise CheckpointError(f"checkpoint {where} does not match this run's model/layout:\n" + "\n".join(diff)
                              + "\nuse the checkpoint's settings, or convert it (export-hf / import-hf) to re-shard")
