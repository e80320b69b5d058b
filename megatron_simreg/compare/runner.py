"""Training the grid's runs: one after another here, or as a SLURM job array; finished runs are skipped.

Each run lives in ``OUT/runs/<name>/``: ``run.json`` (its flags), ``checkpoints/`` (the trainer's
``--save``/``--load``, with ``metrics.jsonl``), ``train.log`` (local) or ``logs/`` (SLURM). A run is
*finished* when its latest checkpoint is its last iteration; an *interrupted* run (a checkpoint before
that: a crash, a preemption, Ctrl-C) resumes from it, because every run is started with ``--load`` on
its own ``--save`` directory. The same layout is a job array's (``submit --array``), so a grid can
start on SLURM and be finished or analysed locally, or the other way round.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import List, Optional, Tuple

from ..slurm.submit import checkpoint_iteration
from .grid import Grid, GridError, Run


def run_dir(out: str, run: Run) -> str:
    return os.path.join(out, "runs", run.name)


def checkpoint_dir(out: str, run: Run) -> str:
    return os.path.join(run_dir(out, run), "checkpoints")


def state(out: str, run: Run) -> Tuple[str, Optional[int]]:
    """``("finished" | "interrupted" | "new", latest checkpointed iteration)``."""
    it = checkpoint_iteration(checkpoint_dir(out, run))
    if it is None:
        return "new", None
    return ("finished" if it >= run.train_iters else "interrupted"), it


def record_flags(out: str, run: Run) -> None:
    """Write ``run.json``, or refuse when the directory holds the same run started with other flags."""
    path = os.path.join(run_dir(out, run), "run.json")
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f).get("train_argv")
        if old != run.train_argv:
            raise GridError(f"{run_dir(out, run)} holds run {run.name} started with other flags:\n  was: "
                            f"{' '.join(old or [])}\n  now: {' '.join(run.train_argv)}\nThe grid changed; use a "
                            "new --out, or delete that run's directory to retrain it")
        return
    os.makedirs(run_dir(out, run), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"name": run.name, "model": run.model, "method": run.method, "seed": run.seed,
                   "train_iters": run.train_iters, "train_argv": run.train_argv}, f, indent=1)
    os.replace(path + ".tmp", path)


def train_command(out: str, run: Run, nproc_per_node: int = 1) -> List[str]:
    ckpt = checkpoint_dir(out, run)
    cmd = [sys.executable, "-m", "megatron_simreg.cli", "train", *run.train_argv, "--save", ckpt, "--load", ckpt,
           "--fresh-start"]
    if nproc_per_node > 1:
        cmd += ["--nproc-per-node", str(nproc_per_node)]
    return cmd


def train_local(out: str, run: Run, nproc_per_node: int = 1, log=print) -> None:
    """Train (or resume) ``run`` in a subprocess, its output in ``train.log``; raise with the log's tail on failure."""
    cmd = train_command(out, run, nproc_per_node)
    log_path = os.path.join(run_dir(out, run), "train.log")
    with open(log_path, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-25:])
        raise RuntimeError(f"run {run.name} failed (exit {code}); its last checkpoint is kept and the next "
                           f"`compare` resumes it. End of {log_path}:\n{tail}")


def train_all(grid: Grid, out: str, nproc_per_node: int = 1, log=print) -> None:
    """Train every unfinished run here, in grid order."""
    for i, run in enumerate(grid.runs, 1):
        record_flags(out, run)
        st, it = state(out, run)
        prefix = f"[{i}/{len(grid.runs)}] {run.name}"
        if st == "finished":
            log(f"{prefix}: finished (iteration {it}), skipped")
            continue
        log(f"{prefix}: " + (f"resuming from iteration {it} of {run.train_iters}" if st == "interrupted"
                             else f"training {run.train_iters} iterations")
            + f" (log: {os.path.join(run_dir(out, run), 'train.log')})")
        train_local(out, run, nproc_per_node, log)


def submit_slurm(grid: Grid, out: str, cluster: dict, dry_run: bool = False, log=print) -> Optional[str]:
    """Submit the unfinished runs as one job array over ``OUT/runs``; returns the job id (``None``: nothing to do).

    ``cluster`` holds :class:`~megatron_simreg.slurm.script.JobSpec` fields (nodes, gpus_per_node, partition...).
    A previous submission still queued or running is not submitted twice.
    """
    from ..slurm import submit as sub
    from ..slurm.script import JobSpec, passthrough_env, render

    runs_dir = os.path.join(out, "runs")
    info = sub.read_info(runs_dir)
    if info.get("job_ids") and not dry_run:
        states = sub.job_states(info["job_ids"][-1])
        active = {k: v for k, v in states.items() if v not in sub.TERMINAL}
        if active:
            log(f"job {info['job_ids'][-1]} is still in the queue or running ({len(active)} tasks); not submitting "
                f"again. Follow it with `megatron-simreg status {runs_dir}`; rerun this command when it ends")
            return info["job_ids"][-1]
    todo = [r for r in grid.runs if state(out, r)[0] != "finished"]
    if not todo:
        return None
    tasks = [sub.make_task(r.name, r.train_argv) for r in todo]
    spec = JobSpec(run_dir=os.path.abspath(runs_dir), tasks=tasks, array=True, env=passthrough_env(), **cluster)
    spec.validate()
    if dry_run:
        sys.stdout.write(render(spec))
        return None
    for r in todo:
        record_flags(out, r)
    job_id = sub.sbatch(sub.write(spec))
    log(f"submitted job array {job_id}: {len(tasks)} runs ({', '.join(r.name for r in todo)})")
    return job_id
