"""The sbatch script: a readable bash file, written into the run directory.

One ``srun`` task per node runs ``torchrun`` (``python -m torch.distributed.run``)
with a c10d rendezvous on the first node of ``scontrol show hostnames
$SLURM_JOB_NODELIST``; or, with ``launcher="deepspeed"``, DeepSpeed's runner
with ``--launcher slurm`` starts one srun task per process. Each process runs
``megatron_simreg.cli train`` in-process (``RANK`` is set).

Preemption: the job asks for ``--signal=B:USR1@SECONDS`` and ``--requeue``.
The script traps SIGUSR1 (SLURM's time-limit warning, or ``scancel
--signal=USR1 --batch JOB``), forwards it to every process of the job's steps
(the trainers checkpoint at the next step boundary and exit 0; torchrun itself
ignores SIGUSR1), and once they have exited requeues the job unless the last
checkpoint is the final iteration. The train command always gets ``--save
CKPT --load CKPT --fresh-start``, so the requeued job resumes where it stopped.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

LAUNCHERS = ("torchrun", "deepspeed")
# Environment variables copied from the submitting shell into the script.
PASSTHROUGH_PREFIXES = ("NCCL_",)


@dataclass
class Task:
    """One training run: a single job has one, a job array one per array index."""

    name: str  # subdirectory of the run directory ("" for a single job)
    train_argv: List[str]
    train_iters: int
    model_parallel: Dict[str, int] = field(default_factory=dict)  # tp, cp, pp


@dataclass
class JobSpec:
    run_dir: str
    tasks: List[Task]
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: Optional[int] = None  # default: gpus_per_node, or 1 on CPU
    partition: Optional[str] = None
    time: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    exclusive: bool = False
    container_image: Optional[str] = None
    container_mounts: Optional[str] = None
    launcher: str = "torchrun"
    job_name: str = "megatron-simreg"
    signal_seconds: int = 300
    rdzv_port: Optional[int] = None  # default: 20000 + job id % 20000
    python: str = field(default_factory=lambda: sys.executable)
    workdir: str = field(default_factory=os.getcwd)
    env: Dict[str, str] = field(default_factory=dict)  # exported verbatim (NCCL_* passthrough)
    array: bool = False  # a job array over ``tasks`` (also with a single task)

    @property
    def procs_per_node(self) -> int:
        if self.nproc_per_node:
            return self.nproc_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    def validate(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if self.gpus_per_node and self.nproc_per_node and self.nproc_per_node > self.gpus_per_node:
            raise ValueError(f"--nproc-per-node {self.nproc_per_node} is more than --gpus-per-node "
                             f"{self.gpus_per_node}: one process per GPU at most")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if bool(self.container_mounts) and not self.container_image:
            raise ValueError("--container-mounts needs --container-image")
        if self.signal_seconds < 1:
            raise ValueError("--signal-seconds must be >= 1")
        if not self.tasks:
            raise ValueError("no training task to run")
        if len(self.tasks) > 1 and not self.array:
            raise ValueError("several tasks need a job array")
        world = self.nodes * self.procs_per_node
        for t in self.tasks:
            mp = t.model_parallel.get("tp", 1) * t.model_parallel.get("pp", 1) * t.model_parallel.get("cp", 1)
            if world % mp:
                where = f" (array task {t.name})" if t.name else ""
                raise ValueError(f"{self.nodes} node(s) x {self.procs_per_node} process(es) = {world} processes is "
                                 f"not divisible by TP x PP x CP = {mp}{where}")

    @property
    def needs_one_connection(self) -> bool:
        """``CUDA_DEVICE_MAX_CONNECTIONS=1``: Megatron overlaps TP/CP communication with compute only with it."""
        return any(t.model_parallel.get("tp", 1) > 1 or t.model_parallel.get("cp", 1) > 1 for t in self.tasks)


def passthrough_env(environ=None) -> Dict[str, str]:
    """The user's NCCL variables, to be exported by the job script."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in sorted(environ.items()) if k.startswith(PASSTHROUGH_PREFIXES)}


def _q(s) -> str:
    return shlex.quote(str(s))


def _words(argv: List[str], indent: str = "    ") -> str:
    """A bash array body, a few words per line for reading."""
    lines, cur = [], []
    for a in argv:
        if a.startswith("--") and cur:
            lines.append(" ".join(cur))
            cur = []
        cur.append(_q(a))
    if cur:
        lines.append(" ".join(cur))
    return "\n".join(indent + line for line in lines)


def render(spec: JobSpec) -> str:
    """The sbatch script for ``spec`` (call ``spec.validate()`` first)."""
    run_dir = os.path.abspath(spec.run_dir)
    p = spec.procs_per_node
    on_gpu = spec.gpus_per_node > 0
    out = ["#!/bin/bash",
           f"# Written by `megatron-simreg submit`: {spec.nodes} node(s) x {p} "
           f"{'GPU process' if on_gpu else 'CPU (gloo) process'}(es) per node, launcher {spec.launcher}.",
           f"# Resubmit by hand: sbatch {_q(os.path.join(run_dir, 'job.sbatch'))}",
           f"#SBATCH --job-name={spec.job_name}",
           f"#SBATCH --nodes={spec.nodes}",
           "#SBATCH --ntasks-per-node=1"]
    if on_gpu:
        out.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
    for flag, value in (("partition", spec.partition), ("time", spec.time), ("account", spec.account),
                        ("qos", spec.qos)):
        if value:
            out.append(f"#SBATCH --{flag}={value}")
    if spec.exclusive:
        out.append("#SBATCH --exclusive")
    log_name = "slurm-%A_%a.out" if spec.array else "slurm-%j.out"
    out += [f"#SBATCH --chdir={spec.workdir}",
            f"#SBATCH --output={os.path.join(run_dir, 'logs', log_name)}",
            "#SBATCH --open-mode=append",
            f"#SBATCH --signal=B:USR1@{spec.signal_seconds}",
            "#SBATCH --requeue"]
    if spec.array:
        out.append(f"#SBATCH --array=0-{len(spec.tasks) - 1}")
    out += ["", "set -uo pipefail", "",
            f"RUN_DIR={_q(run_dir)}",
            f"PYTHON={_q('python' if spec.container_image else spec.python)}"]

    if spec.array:
        out += ["", "# --- this array task: its flags, and its own subdirectory of the run directory",
                'case "$SLURM_ARRAY_TASK_ID" in']
        for i, t in enumerate(spec.tasks):
            out.append(f"  {i}) TASK={_q(t.name)}; TRAIN_ITERS={t.train_iters}; TRAIN_ARGS=(")
            out.append(_words(t.train_argv, "       "))
            out.append("     ) ;;")
        out += ['  *) echo "unknown array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac",
                'RUN_DIR="$RUN_DIR/$TASK"']
    else:
        t = spec.tasks[0]
        out += [f"TRAIN_ITERS={t.train_iters}", "TRAIN_ARGS=(", _words(t.train_argv), ")"]
    out += ['CKPT="$RUN_DIR/checkpoints"',
            'mkdir -p "$RUN_DIR/logs"',
            'echo "[$(date -Is)] job $SLURM_JOB_ID start ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST; '
            'run dir $RUN_DIR"']

    out += ["", "# --- environment"]
    if spec.needs_one_connection:
        out.append("export CUDA_DEVICE_MAX_CONNECTIONS=1  # TP or CP > 1: keeps communication kernels ordered")
    if not on_gpu:
        out.append("export CUDA_VISIBLE_DEVICES=  # --gpus-per-node 0: CPU processes, gloo")
        out.append(f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-$(( ${{SLURM_CPUS_ON_NODE:-{p}}} / {p} > 0 ? "
                   f"${{SLURM_CPUS_ON_NODE:-{p}}} / {p} : 1 ))}}  # the node's CPUs shared by its processes")
    if spec.env:
        out.append("# passed through from the submitting shell")
        out += [f"export {k}={_q(v)}" for k, v in spec.env.items()]

    port = str(spec.rdzv_port) if spec.rdzv_port else "$((20000 + SLURM_JOB_ID % 20000))"
    out += ["", "# --- rendezvous on the first node of the allocation (its NodeAddr: node names need not resolve)",
            'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            "HEAD_ADDR=$(scontrol show node \"$HEAD_NODE\" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)",
            'HEAD_ADDR=${HEAD_ADDR:-$HEAD_NODE}',
            f"PORT={port}",
            'export MASTER_ADDR="$HEAD_ADDR" MASTER_PORT="$PORT"',
            "",
            "# --- the training command: always resumes from the run's own checkpoints when there are any",
            'TRAIN=(-m megatron_simreg.cli train "${TRAIN_ARGS[@]}" --save "$CKPT" --load "$CKPT" --fresh-start)',
            "",
            "# --- preemption: SIGUSR1 (time-limit warning, or `scancel --signal=USR1 --batch JOB`) reaches this",
            "# script; it passes the signal to every process of the job steps. The trainers save at the next",
            "# step boundary and exit; then the job is requeued and resumes from $CKPT.",
            "REQUEUE=0",
            "on_usr1() {",
            '  echo "[$(date -Is)] SIGUSR1: checkpoint, exit, requeue"',
            "  REQUEUE=1",
            '  scancel --signal=USR1 "$SLURM_JOB_ID"',
            "}",
            "trap on_usr1 USR1",
            "trap 'echo \"[$(date -Is)] SIGTERM: the trainers checkpoint at the next step and exit\"' TERM",
            ""]

    srun_io = '--output="$RUN_DIR/logs/node%n.log" --open-mode=append'
    container = ""
    if spec.container_image:
        container = f" \\\n    --container-image={_q(spec.container_image)}"
        if spec.container_mounts:
            container += f" --container-mounts={_q(spec.container_mounts)}"
        container += f" --container-workdir={_q(spec.workdir)}"
    if spec.launcher == "torchrun":
        out += ["# --- one srun task per node; each runs torchrun (torch.distributed.run), which ignores SIGUSR1",
                f"srun --nodes={spec.nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 {srun_io}{container} \\",
                "  bash -c 'trap \"\" USR1; exec \"$@\"' torchrun \\",
                f'  "$PYTHON" -m torch.distributed.run --nnodes={spec.nodes} --nproc-per-node={p} \\',
                '    --rdzv-backend=c10d --rdzv-endpoint="$HEAD_ADDR:$PORT" --rdzv-id="$SLURM_JOB_ID" \\',
                '    "${TRAIN[@]}" &']
    else:
        gpus = f" --num_gpus {p}" if on_gpu else ""
        launcher_args = f"--kill-on-bad-exit=1 {srun_io.replace(chr(34), '')}{container.replace(chr(92) + chr(10), '')}"
        out += ["# --- DeepSpeed's runner with --launcher slurm: one srun task per process, from this node",
                f'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\\$/ slots={p}/" > "$RUN_DIR/hostfile"',
                "DS_ENTRY=$(\"$PYTHON\" -c 'import megatron_simreg.slurm.ds_entry as m; print(m.__file__)')",
                f'"$PYTHON" -m deepspeed.launcher.runner --hostfile "$RUN_DIR/hostfile" --launcher slurm --no_ssh_check '
                f"--num_nodes {spec.nodes}{gpus} \\",
                '  --master_addr "$HEAD_ADDR" --master_port "$PORT" \\',
                f'  --launcher_args "{launcher_args}" \\',
                '  "$DS_ENTRY" "${TRAIN[@]:2}" &']
    out += ["LAUNCH_PID=$!",
            "while :; do  # a trapped signal interrupts `wait`: wait again until the launcher has exited",
            '  wait "$LAUNCH_PID"; RC=$?',
            '  kill -0 "$LAUNCH_PID" 2>/dev/null || break',
            "done",
            'LAST=$(cat "$CKPT/latest_checkpointed_iteration.txt" 2>/dev/null || echo 0)',
            'echo "[$(date -Is)] launcher exit code $RC; last checkpoint: iteration $LAST of $TRAIN_ITERS"',
            'if [ "$REQUEUE" = 1 ] && [ "$LAST" -lt "$TRAIN_ITERS" ]; then',
            '  echo "[$(date -Is)] requeueing job $SLURM_JOB_ID: it resumes from iteration $LAST"',
            '  scontrol requeue "$SLURM_JOB_ID"',
            "  exit 0",
            "fi",
            'exit "$RC"',
            ""]
    return "\n".join(out)
