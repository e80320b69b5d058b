"""Atomic, resumable checkpoints in Megatron-LM's on-disk layout, behind one interface both backends serve.

Layout::

    <save>/latest_checkpointed_iteration.txt   "12"  (Megatron-LM's pointer file)
    <save>/iter_0000012/meta.json              ours: iteration, model settings (incl. the layout it ran at), backend
    Megatron backend (megatron-core dist_checkpointing, format torch_dist, as Megatron-LM writes it):
    <save>/iter_0000012/metadata.json          dist_checkpointing's format marker
    <save>/iter_0000012/common.pt              non-sharded state (scheduler, optimizer param groups, ...)
    <save>/iter_0000012/__<r>_<i>.distcp, .metadata
                                               every tensor shard written once (not once per DP rank):
                                               "model", "optimizer", "opt_param_scheduler", "rng_state"
    DeepSpeed backend:
    <save>/iter_0000012/deepspeed/state/...    DeepSpeed's engine checkpoint (mp_rank_XX_model_states.pt,
                                               ZeRO optimizer partitions)
    <save>/iter_0000012/rng_00003.pt           this rank's RNG states

The Megatron backend's checkpoint is the model's and the optimizer's
``sharded_state_dict``: a run may resume it at any TP/PP/DP layout (the
settings that must match are the model's shape, :func:`check_compatible`),
and Megatron-LM's and Megatron-Bridge's tools read it. The DeepSpeed backend
keeps DeepSpeed's own engine checkpoint: ZeRO partitions the optimizer state
over DeepSpeed's flat buffers, which megatron-core's sharded state dicts do
not describe, and DeepSpeed's own tools (``zero_to_fp32``, the universal
checkpoint converter) read that format; so it resumes at the layout it was
saved at.

A backend serves ``write_checkpoint(dir, iteration)`` (every rank, collective),
``read_checkpoint(dir, load_optim, load_rng)`` and ``reshardable`` (whether
the layout may change). :func:`save` writes everything into
``iter_XXXXXXX.tmp``, renames it once every rank has finished, and only then
rewrites the pointer (through a temporary file and ``os.replace``). A crash at
any point leaves the previous checkpoint and pointer intact; a stale ``.tmp``
directory is ignored and replaced by the next save. :func:`resume_point` and
:func:`resume` are the trainer's ``--load``.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

POINTER = "latest_checkpointed_iteration.txt"
ITER_DIR = re.compile(r"iter_\d{7}")
# Test hook: set to an iteration number to crash that save after this rank's
# files are written, before the rename (tests/test_checkpointing.py).
CRASH_ENV = "MEGATRON_SIMREG_CRASH_IN_SAVE"
# model_settings() fields that describe the layout, not the model: a reshardable checkpoint may differ in them
LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
               "data_parallel_size")


class CheckpointError(RuntimeError):
    pass


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def rng_state() -> Dict[str, Any]:
    """This process's RNG states, under Megatron-LM's key names.

    Only tensors and plain Python values, so :func:`load_rank_file` can read
    them with ``torch.load(weights_only=True)``, which unpickles no arbitrary
    objects: NumPy's state is stored as the same 5-tuple with the key array as
    a list of ints, which ``np.random.set_state`` (ours and Megatron-LM's)
    takes as it is.
    """
    from megatron.core import tensor_parallel

    state = {"random_rng_state": random.getstate(), "np_rng_state": _plain_np_state(np.random.get_state()),
             "torch_rng_state": torch.get_rng_state(),
             "rng_tracker_states": dict(tensor_parallel.get_cuda_rng_tracker().get_states())}
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def _plain_np_state(state) -> tuple:
    """``np.random.get_state()``'s ``(name, uint32 keys, pos, has_gauss, cached_gaussian)`` without NumPy types."""
    name, keys, pos, has_gauss, cached_gaussian = state
    return str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached_gaussian)


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore :func:`rng_state` (either NumPy format: list keys or, in older checkpoints, an array)."""
    from megatron.core import tensor_parallel

    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if "cuda_rng_state" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def run_meta(args, settings: Dict[str, Any], tokenizer_model: Optional[str],
             tokenizer_type: str = "SentencePieceTokenizer") -> Dict[str, Any]:
    """``meta.json`` of a training run's checkpoints (:func:`save` adds the iteration)."""
    return {"model": settings, "backend": "deepspeed" if args.deepspeed else "megatron",
            "tokenizer_model": tokenizer_model, "tokenizer_type": tokenizer_type,  # for export-hf
            "args": {k: v for k, v in vars(args).items()
                     if not k.startswith("_") and isinstance(v, (int, float, str, bool, list, type(None)))}}


def save(root: str, iteration: int, meta: Dict[str, Any], backend) -> str:
    """Write checkpoint ``iteration`` atomically; every rank calls this. Returns the final directory.

    A failed write (a full disk, most often) is agreed on by all ranks, its
    partial ``.tmp`` directory removed, and raised on every rank as one
    :class:`CheckpointError` naming the cause and the intact previous checkpoint.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    failure = None
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
            os.makedirs(tmp)
        except OSError as e:  # agreed on below: the other ranks must not wait for rank 0 in a barrier
            failure = e
    # also the barrier: the directory exists before any rank writes into it
    _raise_if_any_failed(failure, root, tmp, rank, remove=None, left="nothing was written")
    try:
        backend.write_checkpoint(tmp, iteration)
        if rank == 0:
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({**meta, "iteration": iteration}, f, indent=1, sort_keys=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        failure = e
    if os.environ.get(CRASH_ENV) == str(iteration):
        raise RuntimeError(f"crash injected into the save of iteration {iteration} ({CRASH_ENV})")
    _raise_if_any_failed(failure, root, tmp, rank, remove=tmp)  # also the barrier: every rank has written
    failure = remove = None
    if rank == 0:
        renamed = moved_aside = False
        try:
            _fsync_tree(tmp)  # the files' data, then the directory entries, reach the disk before the rename
            if os.path.exists(final):  # re-saving an iteration: move the old copy aside first
                shutil.rmtree(final + ".old", ignore_errors=True)
                # a crash from here to the next rename leaves no `final`: find() restores it from `.old`
                os.rename(final, final + ".old")
                moved_aside = True
            os.rename(tmp, final)
            renamed = True
            _fsync_path(root)  # the rename itself
            pointer_tmp = os.path.join(root, POINTER + ".tmp")
            with open(pointer_tmp, "w") as f:
                f.write(str(iteration))
                f.flush()
                os.fsync(f.fileno())
            os.replace(pointer_tmp, os.path.join(root, POINTER))
            _fsync_path(root)  # the pointer's replacement
            shutil.rmtree(final + ".old", ignore_errors=True)
        except OSError as e:  # the pointer still names the previous checkpoint
            failure = e
            if moved_aside and not renamed:  # put the previous copy back (else find() will)
                try:
                    os.rename(final + ".old", final)
                except OSError:
                    pass
            # after the rename the directory is complete: keep it (the pointer decides what is resumed)
            remove = None if renamed else tmp
    _raise_if_any_failed(failure, root, tmp, rank, remove=remove)
    return final


# Free space below which an opaque write error (torch's C++ writer may say only "basic_ios::clear: iostream
# error") is taken for a full disk.
NEARLY_FULL_BYTES = 64 << 20
NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def _errno(e: BaseException) -> Optional[int]:
    """The first OS error number in ``e``'s chain: causes, contexts, and DCP's per-rank ``failures``."""
    stack, seen = [e], set()
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno:
            return x.errno
        if "No space left on device" in str(x):  # a C++ writer's message quoting strerror
            return errno.ENOSPC
        stack += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            stack += [v[0] if isinstance(v, tuple) else v for v in failures.values()]
    return None


def _no_space(e: BaseException, root: str) -> Optional[str]:
    """``"no space left on device"`` (or the quota's phrase) when ``e`` means the disk is full, else ``None``."""
    code = _errno(e)
    if code is not None:
        return NO_SPACE.get(code)
    try:  # no errno anywhere: an opaque stream error; a (nearly) full disk explains it
        return NO_SPACE[errno.ENOSPC] if shutil.disk_usage(root).free < NEARLY_FULL_BYTES else None
    except OSError:
        return None


def _raise_if_any_failed(failure: Optional[BaseException], root: str, tmp: str, rank: int,
                         remove: Optional[str], left: Optional[str] = None) -> None:
    """Share each rank's failure (a collective, so also a barrier); if any rank failed, rank 0 removes ``remove``
    and every rank raises the same :class:`CheckpointError` (a full disk's first). ``left``: what the failure left
    on disk, when not the default (see :func:`_save_error`)."""
    local = None if failure is None else (rank, _no_space(failure, root), reason(failure))
    if local is not None and local[2].startswith("rank "):  # DCP's reason() names the failing rank itself
        local = (int(local[2].split()[1].rstrip(":")), local[1], local[2].split(": ", 1)[1])
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local)
    else:
        everyone = [local]
    failed = sorted((f for f in everyone if f is not None), key=lambda f: (f[1] is None, f[0]))
    if not failed:
        return
    if rank == 0 and remove:
        shutil.rmtree(remove, ignore_errors=True)
    raise _save_error(root, tmp, *failed[0], removed=bool(remove), left=left) from failure


def _save_error(root: str, tmp: str, rank: int, no_space: Optional[str], why: str, removed: bool,
                left: Optional[str] = None) -> CheckpointError:
    """The message: what failed, that the previous checkpoint is intact, and what to do."""
    try:
        previous = find(root)
    except CheckpointError:
        previous = None
    if previous is None:
        kept = f"there is no earlier checkpoint in {root}"
        then = "then run again"
    else:
        kept = f"the previous checkpoint {iteration_dir(root, previous)} is intact"
        then = f"then resume with --load {root}"
    # removed: the partial .tmp; otherwise it was renamed complete, but the pointer still names the previous one
    left = left or ("the partial directory is removed" if removed else f"{tmp[:-4]} is complete but not pointed to")
    if no_space:
        return CheckpointError(f"{no_space} while writing {tmp} (rank {rank}: {why}); {left} and {kept}. Free space "
                               f"on {root} or point --save at another filesystem, {then}")
    return CheckpointError(f"writing checkpoint {tmp} failed (rank {rank}: {why}); {left} and {kept}. Fix the cause, "
                           f"{then}")


def _fsync_path(path: str) -> None:
    """fsync a file or a directory (a directory's fsync makes its new entries, e.g. a rename, durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # some filesystems cannot fsync a directory
            raise
    finally:
        os.close(fd)


def _fsync_tree(directory: str) -> None:
    """Every file under ``directory``, then each directory bottom-up (rank 0 sees every rank's files on the
    shared filesystem a multi-node save needs anyway)."""
    for dirpath, _, filenames in os.walk(directory, topdown=False):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def resume_point(load: Optional[str], ckpt_step: Optional[int] = None,
                 fresh_start: bool = False) -> Optional[Tuple[int, Dict[str, Any]]]:
    """``--load DIR [--ckpt-step N]``: ``(iteration, meta.json)`` to resume from, ``None`` to start from scratch.

    The pointer file names the iteration unless ``ckpt_step`` does. With no
    pointer, ``fresh_start`` starts from scratch only when ``load`` holds no
    ``iter_*`` directory: those are checkpoints a kill left without a pointer,
    and a fresh run would overwrite them.
    """
    if not load:
        return None
    if ckpt_step is not None:
        restore_interrupted_resave(load, ckpt_step)
        if not os.path.isfile(os.path.join(iteration_dir(load, ckpt_step), "meta.json")):
            raise CheckpointError(f"--ckpt-step {ckpt_step}: {iteration_dir(load, ckpt_step)} is not a complete "
                                  f"checkpoint; complete ones under --load {load}: {complete_iterations(load) or 'none'}")
        return ckpt_step, load_meta(load, ckpt_step)
    iteration = find(load) if os.path.isdir(load) else None
    if iteration is None:
        orphans = sorted(d for d in os.listdir(load) if ITER_DIR.fullmatch(d)) if os.path.isdir(load) else []
        if orphans:
            done = complete_iterations(load)
            fix = (f"resume from the newest complete one with --load {load} --ckpt-step {done[-1]}" if done else
                   "none of them is complete (no meta.json)")
            raise CheckpointError(
                f"--load {load} holds {len(orphans)} checkpoint(s) ({orphans[0]} ... {orphans[-1]}) but no {POINTER} "
                f"(a save was interrupted before its pointer was written); {fix}, or move the iter_* directories "
                "away to start from scratch")
        if fresh_start:
            return None
        raise CheckpointError(
            f"--load {load}: no checkpoint there ({POINTER} not found). Check the path, or pass "
            "--fresh-start to start from scratch when the directory holds no checkpoint yet")
    return iteration, load_meta(load, iteration)


def complete_iterations(root: str) -> List[int]:
    """The iterations under ``root`` whose directory is complete (``meta.json`` is written last, before the rename)."""
    if not os.path.isdir(root):
        return []
    return sorted(int(d[5:]) for d in os.listdir(root)
                  if ITER_DIR.fullmatch(d) and os.path.isfile(os.path.join(root, d, "meta.json")))


def check_resumable(meta: Dict[str, Any], settings: Dict[str, Any], where: str, reshardable: bool,
                    tokenizer_vocab: Optional[int] = None) -> None:
    """Fail before any model is built when this run cannot load the checkpoint whose ``meta.json`` is ``meta``."""
    if tokenizer_vocab is not None:
        from ..data.tokenizer import check_vocab_fits

        check_vocab_fits(tokenizer_vocab, meta["model"]["padded_vocab_size"])
    check_compatible(meta["model"], settings, where, reshardable=reshardable)


# the flags whose change between save and resume megatron-core 0.16.1 cannot load the optimizer state across (each
# makes another optimizer class, with other state dict keys), and why
OPTIMIZER_FLAGS = {
    "use_distributed_optimizer": "the distributed optimizer's state (sharded over data-parallel ranks) and the "
                                 "regular optimizer's are saved under different keys",
    "bf16": "with --bf16 the optimizer keeps fp32 main copies of the bf16 weights, without it the fp32 weights are "
            "its own: different state"}


def _flags(values: Dict[str, Any]) -> str:
    on = [f"--{k.replace('_', '-')}" for k in OPTIMIZER_FLAGS if values.get(k)]
    return " ".join(on) if on else "neither " + " nor ".join(f"--{k.replace('_', '-')}" for k in OPTIMIZER_FLAGS)


def check_optimizer_resumable(meta: Dict[str, Any], args, settings: Dict[str, Any], where: str) -> None:
    """Before the model is built, refuse a resume with the optimizer state that megatron-core cannot load (which it
    reports as an unreadable checkpoint): ``--use-distributed-optimizer`` or ``--bf16`` turned on or off, or another
    TP/PP size from a distributed optimizer's "dp_reshardable" state (Megatron-LM refuses the latter the same way).
    Each message names ``--no-load-optim``. The Megatron backend's checkpoints only; ``where``: the directory."""
    if meta.get("backend") != "megatron" or args.deepspeed:
        return
    saved = {k: bool((meta.get("args") or {}).get(k, False)) for k in OPTIMIZER_FLAGS}
    current = {k: bool(getattr(args, k)) for k in OPTIMIZER_FLAGS}
    weights_only = (f"pass --no-load-optim to resume the weights only (Adam's moments start from zero; the LR "
                    f"schedule continues from iteration {meta.get('iteration')})")
    if saved != current:
        lines = [f"  --{k.replace('_', '-')}: checkpoint={'on' if saved[k] else 'off'} run="
                 f"{'on' if current[k] else 'off'} ({OPTIMIZER_FLAGS[k]})"
                 for k in OPTIMIZER_FLAGS if saved[k] != current[k]]
        raise CheckpointError(
            f"checkpoint {where} holds the optimizer state of a run with {_flags(saved)}, which this run "
            f"({_flags(current)}) cannot load:\n" + "\n".join(lines) + f"\n{weights_only}, or resume as the "
            f"checkpoint was saved ({_flags(saved)})")
    tp_pp = ("tensor_model_parallel_size", "pipeline_model_parallel_size")
    if not current["use_distributed_optimizer"] or all(meta["model"].get(k) == settings.get(k) for k in tp_pp):
        return
    from megatron.core import dist_checkpointing
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    try:
        sharding = (dist_checkpointing.load_content_metadata(where) or {}).get("distrib_optim_sharding_type")
    except Exception:  # noqa: BLE001 - unreadable: the load itself says so
        return
    if sharding is None or sharding in DistributedOptimizer.checkpoint_fully_reshardable_formats:
        return
    was = "TP={}, PP={}".format(*(meta["model"].get(k) for k in tp_pp))
    now = "TP={}, PP={}".format(*(settings.get(k) for k in tp_pp))
    raise CheckpointError(
        f"checkpoint {where} was saved at {was} with the distributed optimizer's state in the {sharding!r} format "
        f"(the default), which only a run at the same tensor- and pipeline-parallel sizes can load; this run is at "
        f"{now}. Resume at {was} (the data-parallel size may change); or {weights_only}. To change TP/PP with the "
        f"optimizer state, save it with --dist-ckpt-optim-fully-reshardable (resume at {was} with that flag until "
        "the next save)")


def resume(load: str, iteration: int, meta: Dict[str, Any], backend, settings: Dict[str, Any], *,
           load_optim: bool = True) -> None:
    """Restore checkpoint ``iteration`` under ``load`` (see :func:`resume_point`, :func:`check_resumable`).

    ``settings`` is this run's ``model_settings()``. RNG states are restored
    only when the checkpoint has them and the TP/PP layout is unchanged (as
    Megatron-LM does); otherwise the run keeps its seeded ones. Without the
    optimizer state, the LR schedule is this run's, placed at ``iteration``.
    """
    directory = iteration_dir(load, iteration)
    same_layout = all(meta["model"].get(k) == settings.get(k)
                      for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size"))
    load_optim = load_optim and "imported_from" not in meta  # an import-hf checkpoint holds model weights only
    backend.read_checkpoint(directory, load_optim=load_optim, load_rng=same_layout and "imported_from" not in meta)
    if not load_optim:
        backend.scheduler.step(increment=iteration)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"loaded checkpoint {directory} (iteration {iteration})", flush=True)


def check_writable(root: str) -> None:
    """Fail now, not at the first save after hours of training, when ``--save`` cannot be written."""
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"--save {root} is not writable ({e.strerror or e}); pick a directory this job can "
                              "write to") from e


def find(root: str) -> Optional[int]:
    """The iteration the pointer names, ``None`` when ``root`` holds no checkpoint."""
    pointer = os.path.join(root, POINTER)
    if not os.path.isfile(pointer):
        return None
    text = open(pointer).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{pointer} is corrupt (holds {text[:40]!r}, expected an iteration number); "
                              f"fix it to name one of the iter_* directories in {root}")
    restore_interrupted_resave(root, int(text))
    return int(text)


def restore_interrupted_resave(root: str, iteration: int) -> None:
    """Undo a re-save of ``iteration`` that was killed between its two renames (:func:`save`).

    Such a save has moved the complete previous ``iter_N`` to ``iter_N.old``
    and not yet renamed ``iter_N.tmp`` to ``iter_N``: the pointer may name a
    missing directory. ``iter_N.old`` is the copy the pointer named when the
    save began, so it is renamed back. Every rank may call this at once: one
    rename wins, the others then find ``iter_N`` in place.
    """
    final = iteration_dir(root, iteration)
    old = final + ".old"
    if os.path.isdir(final) or not os.path.isfile(os.path.join(old, "meta.json")):
        return
    try:
        os.rename(old, final)
    except OSError as e:
        if not os.path.isdir(final):  # not another rank's rename: e.g. a read-only --load
            raise CheckpointError(f"{final} is missing: a re-save of it was interrupted and left the previous copy "
                                  f"in {old}, which cannot be renamed back ({e.strerror or e}); rename it to {final}, "
                                  "then run again") from e
        return
    print(f"{final} was missing (a re-save of it was interrupted): restored the previous copy from {old}",
          flush=True)


def load_meta(root: str, iteration: int) -> Dict[str, Any]:
    path = os.path.join(iteration_dir(root, iteration), "meta.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {iteration_dir(root, iteration)} is missing or corrupt ({e}); "
                              "point --load at another checkpoint directory") from e


def load_rank_file(path: str) -> Dict[str, Any]:
    """A per-rank ``.pt`` file (our ``rng_XXXXX.pt``, DeepSpeed's ``mp_rank_XX_model_states.pt``).

    ``weights_only=True``: a checkpoint may come from elsewhere, and a full
    unpickle runs whatever code the file names. A file that needs it anyway is
    refused, never retried unsafely.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file is unusable as it is
        refused = _refused_global(e)
        if refused:
            raise CheckpointError(
                f"refusing to read {path}: it holds a pickled reference to {refused}, and unpickling that could run "
                "arbitrary code (only tensors and plain values are read); megatron-simreg's trainer and DeepSpeed do "
                "not write such files: point --load at another checkpoint") from e
        raise CheckpointError(f"cannot read {path} ({reason(e)}); the checkpoint is corrupt or incomplete: point "
                              "--load at another checkpoint") from e


def _refused_global(e: BaseException) -> Optional[str]:
    """The global (``module.name``) a ``weights_only`` load refused, or ``None`` for another failure."""
    if not isinstance(e, pickle.UnpicklingError):
        return None
    m = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module \S+ is blocked)", str(e))
    return m.group(1) if m else None


def reason(e: BaseException) -> str:
    """One line saying why a read failed; torch DCP's ``CheckpointException`` (a ``BaseException``) wraps each
    failed rank's exception."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (inner, _) = next(iter(failures.items()))
        return f"rank {rank}: {reason(inner)}"
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def check_compatible(saved: Dict[str, Any], current: Dict[str, Any], where: str, reshardable: bool = False) -> None:
    """Fail, listing every differing field and the flag that fixes it, when the model (or, unless ``reshardable``,
    the layout) differs. Fields an older checkpoint lacks compare as the value it was trained with; the training
    sequence length and the init std may change."""
    from .model_setup import FREE_KEYS, MODEL_KEYS, flag, normalized

    saved, current = normalized(saved), normalized(current)
    keys = sorted(k for k in set(saved) | set(current)
                  if k not in FREE_KEYS and not (reshardable and k in LAYOUT_KEYS))
    differing = [k for k in keys if saved.get(k) != current.get(k)]
    if not differing:
        return
    lines, fixes = [], []
    for k in differing:
        lines.append(f"  {k}: checkpoint={saved.get(k)!r} run={current.get(k)!r}")
        if k == "padded_vocab_size":
            fixes.append(f"a tokenizer and --make-vocab-size-divisible-by x --tensor-model-parallel-size that pad "
                         f"the vocabulary to the checkpoint's {saved.get(k)} rows (this run pads to {current.get(k)})")
        elif k == "data_parallel_size":
            fixes.append(f"as many ranks as give data-parallel size {saved.get(k)}")
        elif k in saved:
            fixes.append(flag(k, saved[k]))
    hint = "use " + "; ".join(fixes)
    if any(k in MODEL_KEYS or k == "padded_vocab_size" for k in differing):
        hint += "; or --use-checkpoint-args to take every model flag from the checkpoint"
    if not reshardable and any(k in LAYOUT_KEYS for k in differing):
        hint += ". This backend resumes only at the layout it saved; convert it (export-hf / import-hf) to re-shard"
    raise CheckpointError(f"checkpoint {where} does not match this run's model/layout:\n" + "\n".join(lines)
                          + "\n" + hint)
