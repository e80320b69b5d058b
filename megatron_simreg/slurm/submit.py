"""Submitting a run directory's job, waiting for it, and reporting its state.

A run directory holds ``job.sbatch`` (the script), ``job.json`` (job id,
tasks, the iteration count of each), ``logs/`` and ``checkpoints/`` (for a job
array: one subdirectory per task, each with ``logs/`` and ``checkpoints/``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from typing import Dict, List, Optional, Tuple

from .script import JobSpec, Task, render

# SLURM job states after which a job will not run again by itself.
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}
OWN_FLAGS = {"--save": "the run directory's checkpoints/", "--load": "the run directory's checkpoints/",
             "--nproc-per-node": "submit's --nproc-per-node"}
_NAME_OK = re.compile(r"^[A-Za-z0-9._+-]+$")


class SlurmError(RuntimeError):
    pass


# --------------------------------------------------------------------------- tasks and grids

def make_task(name: str, train_argv: List[str]) -> Task:
    """Parse the train flags now (``--config`` included): bad flags fail at submission, not in the queue."""
    from ..training.args import parse_train_args

    for a in train_argv:
        flag = a.split("=", 1)[0]
        if flag in OWN_FLAGS:
            raise ValueError(f"{flag}: submit sets it ({OWN_FLAGS[flag]}); drop it from the train flags")
    # --save is set by the job script; give the parser a stand-in so rules like
    # "--save-interval needs --save" see the run as it will be.
    args = parse_train_args(list(train_argv) + ["--save", "RUN_DIR/checkpoints"])
    config_keys = {}
    if args.config:
        import yaml

        with open(args.config) as f:
            config_keys = {k.replace("_", "-") for k in (yaml.safe_load(f) or {})}
    for key in ("save", "load", "nproc-per-node"):  # also refused when they come from --config
        if key in config_keys:
            raise ValueError(f"--{key} (from --config): submit sets it ({OWN_FLAGS['--' + key]}); "
                             "remove it from the config")
    return Task(name=name, train_argv=list(train_argv), train_iters=args.train_iters,
                model_parallel={"tp": args.tensor_model_parallel_size, "pp": args.pipeline_model_parallel_size,
                                "cp": args.context_parallel_size})


def _flags(value, where: str) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            flag = k if str(k).startswith("--") else "--" + str(k)
            if v is True:
                out.append(flag)
            elif v is False or v is None:
                continue
            elif isinstance(v, list):
                out += [flag, *map(str, v)]
            else:
                out += [flag, str(v)]
        return out
    raise ValueError(f"{where}: flags must be a list, a string or a mapping of flag names to values")


def load_grid(path: str) -> List[Tuple[str, List[str]]]:
    """``[(name, extra train flags)]`` from a YAML grid.

    Either a list ``[{name: baseline, flags: [...]}, ...]`` (optionally under a
    ``runs:`` key) or a mapping ``{baseline: {simreg-weight: 0}, simreg: ...}``.
    Flags are a list, a string (shell words) or a mapping of flag names to values.
    """
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"--array {path}: no such file")
    with open(path) as f:
        data = yaml.safe_load(f)
    if isinstance(data, dict) and "runs" in data:
        data = data["runs"]
    if isinstance(data, dict):
        data = [{"name": k, "flags": v} for k, v in data.items()]
    if not isinstance(data, list) or not data:
        raise ValueError(f"--array {path}: expected a non-empty list of runs (name, flags) or a mapping name -> flags")
    out, seen = [], set()
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            item = {"flags": item}
        unknown = set(item) - {"name", "flags"}
        if unknown:
            raise ValueError(f"--array {path}: run {i}: unknown keys {sorted(unknown)} (use name and flags)")
        name = str(item.get("name") or f"task{i}")
        if not _NAME_OK.match(name) or name in (".", ".."):
            raise ValueError(f"--array {path}: run {i}: name {name!r} must be a plain directory name")
        if name in seen or name in ("logs", "checkpoints"):
            raise ValueError(f"--array {path}: run name {name!r} is used twice or reserved")
        seen.add(name)
        out.append((name, _flags(item.get("flags"), f"--array {path}: run {name}")))
    return out


# --------------------------------------------------------------------------- writing and submitting

def write(spec: JobSpec) -> str:
    """Write ``job.sbatch`` and ``job.json`` into the run directory; returns the script's path."""
    run_dir = os.path.abspath(spec.run_dir)
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    path = os.path.join(run_dir, "job.sbatch")
    with open(path + ".tmp", "w") as f:
        f.write(render(spec))
    os.chmod(path + ".tmp", 0o755)
    os.replace(path + ".tmp", path)
    _write_info(run_dir, {"job_ids": read_info(run_dir).get("job_ids", []), "array": spec.array,
                          "nodes": spec.nodes, "procs_per_node": spec.procs_per_node,
                          "tasks": [{"name": t.name, "train_iters": t.train_iters, "train_argv": t.train_argv}
                                    for t in spec.tasks]})
    return path


def read_info(run_dir: str) -> dict:
    try:
        with open(os.path.join(run_dir, "job.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_info(run_dir: str, info: dict) -> None:
    path = os.path.join(run_dir, "job.json")
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, indent=1)
    os.replace(path + ".tmp", path)


def _need(tool: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        raise SlurmError(f"`{tool}` is not on PATH: run this on a SLURM login node (or start the test cluster: "
                         "tools/local_slurm_cluster.sh start, then export SLURM_CONF as it says)")
    return exe


def sbatch(script: str) -> str:
    """Submit; returns the job id."""
    out = subprocess.run([_need("sbatch"), "--parsable", script], capture_output=True, text=True)
    if out.returncode != 0:
        raise SlurmError(f"sbatch failed: {out.stderr.strip() or out.stdout.strip()}")
    job_id = out.stdout.strip().splitlines()[-1].split(";")[0]
    run_dir = os.path.dirname(os.path.abspath(script))
    info = read_info(run_dir)
    info["job_ids"] = info.get("job_ids", []) + [job_id]
    _write_info(run_dir, info)
    return job_id


# --------------------------------------------------------------------------- job state

def _run(cmd: List[str]) -> Optional[str]:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def job_states(job_id: str) -> Dict[str, str]:
    """``{job or array-task id: state}`` from squeue, else sacct, else scontrol; ``{}`` when none knows the job."""
    out = _run(["squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%i %T"])
    states = {}
    for line in (out or "").splitlines():
        parts = line.split()
        if len(parts) >= 2:
            states[parts[0]] = parts[1]
    if states:
        return states
    out = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State"])
    for line in (out or "").splitlines():
        parts = line.split("|")
        if len(parts) >= 2 and parts[0]:
            states[parts[0]] = parts[1].split()[0]  # "CANCELLED by 0" -> CANCELLED
    if states:
        return states
    out = _run(["scontrol", "show", "job", "-o", job_id])
    for line in (out or "").splitlines():
        jid = re.search(r"\bJobId=(\S+)", line)
        aid, tid = re.search(r"\bArrayJobId=(\S+)", line), re.search(r"\bArrayTaskId=(\S+)", line)
        state = re.search(r"\bJobState=(\S+)", line)
        if jid and state:
            key = f"{aid.group(1)}_{tid.group(1)}" if aid and tid else jid.group(1)
            states[key] = state.group(1)
    return states


def wait(job_id: str, poll: float = 5.0, timeout: Optional[float] = None, quiet: bool = False) -> Dict[str, str]:
    """Wait until every task of the job is in a terminal state (requeued runs keep it going); returns the states."""
    start, last = time.time(), None
    while True:
        states = job_states(job_id)
        summary = " ".join(f"{k}:{v}" for k, v in sorted(states.items())) or "unknown"
        if not quiet and summary != last:
            print(f"[{time.strftime('%H:%M:%S')}] job {job_id}: {summary}", flush=True)
            last = summary
        if not states or all(s in TERMINAL for s in states.values()):
            return states
        if timeout is not None and time.time() - start > timeout:
            raise SlurmError(f"job {job_id} still not done after {timeout:.0f} s: {summary}")
        time.sleep(poll)


# --------------------------------------------------------------------------- status

def last_metrics(save_dir: str) -> Optional[dict]:
    path = os.path.join(save_dir, "metrics.jsonl")
    last = None
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        last = json.loads(line)
                    except ValueError:  # a line cut by a crash
                        pass
    except OSError:
        return None
    return last


def checkpoint_iteration(save_dir: str) -> Optional[int]:
    try:
        with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def status(run_dir: str) -> Tuple[str, bool]:
    """A readable report of ``run_dir``, and whether every task finished its iterations."""
    run_dir = os.path.abspath(run_dir)
    if not os.path.isdir(run_dir):
        raise ValueError(f"{run_dir}: no such run directory")
    info = read_info(run_dir)
    job_ids = info.get("job_ids", [])
    tasks = info.get("tasks") or [{"name": "", "train_iters": None}]
    states = job_states(job_ids[-1]) if job_ids else {}
    lines = [f"run dir   {run_dir}"]
    if job_ids:
        lines.append(f"job       {job_ids[-1]}" + (f" (earlier submissions: {', '.join(job_ids[:-1])})"
                                                   if len(job_ids) > 1 else ""))
    else:
        lines.append("job       not submitted (no job id in job.json)")
    all_done = True
    for i, t in enumerate(tasks):
        sub = os.path.join(run_dir, t["name"]) if t["name"] else run_dir
        ckpt = os.path.join(sub, "checkpoints")
        if info.get("array"):
            key = f"{job_ids[-1]}_{i}" if job_ids else None
            lines.append(f"task {i}    {t['name']}")
        else:
            key = job_ids[-1] if job_ids else None
        state = states.get(key) if key else None
        if state is None and len(states) == 1 and not info.get("array"):
            state = next(iter(states.values()))
        if job_ids:
            lines.append(f"  state     {state or 'unknown (no longer known to squeue/sacct/scontrol)'}")
        rec = last_metrics(ckpt)
        it = checkpoint_iteration(ckpt)
        total = t.get("train_iters")
        done = bool(total) and it is not None and it >= total
        all_done = all_done and done
        if rec is None:
            lines.append("  metrics   none yet")
        else:
            lines.append(f"  iteration {rec.get('iteration')}" + (f" of {total}" if total else "")
                         + f" (checkpoint: {it if it is not None else 'none'})")
            keys = [k for k in ("lm_loss", "simreg_loss", "jreg_loss", "moe_aux_loss", "val_loss", "lr", "grad_norm",
                                "tokens_per_sec", "consumed_tokens") if k in rec]
            lines.append("  metrics   " + " ".join(f"{k}={_fmt(rec[k])}" for k in keys))
    return "\n".join(lines), all_done


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)
