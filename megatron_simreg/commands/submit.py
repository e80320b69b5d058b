"""``megatron-simreg submit``: a multi-node SLURM job for ``train``, preemption-safe (see :mod:`megatron_simreg.slurm`).

    megatron-simreg submit --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        --run-dir runs/125m -- --config examples/configs/gpt_125m.yaml --simreg-weight 0.1
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def add_cluster_arguments(p):
    """The job's resources and launcher (shared with ``compare --slurm``)."""
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per node (0: CPU processes with gloo, for tests and small CPU clusters)")
    p.add_argument("--nproc-per-node", type=int, default=None, help="processes per node (default: the GPUs, or 1)")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None, help="time limit, SLURM's format (e.g. 24:00:00)")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--exclusive", action="store_true")
    p.add_argument("--container-image", default=None, help="pyxis/enroot image for srun --container-image")
    p.add_argument("--container-mounts", default=None, help="srun --container-mounts (mount the run dir and data)")
    p.add_argument("--launcher", default="torchrun", choices=["torchrun", "deepspeed"])
    p.add_argument("--job-name", default="megatron-simreg")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="SIGUSR1 this long before the time limit: checkpoint, exit, requeue (default 300)")
    p.add_argument("--rdzv-port", type=int, default=None, help="rendezvous port (default 20000 + job id %% 20000)")


CLUSTER_FIELDS = ("nodes", "gpus_per_node", "nproc_per_node", "partition", "time", "account", "qos", "exclusive",
                  "container_image", "container_mounts", "launcher", "job_name", "signal_seconds", "rdzv_port")


def cluster_fields(args) -> dict:
    """:class:`~megatron_simreg.slurm.script.JobSpec` keyword arguments from :func:`add_cluster_arguments`' flags."""
    return {k: getattr(args, k) for k in CLUSTER_FIELDS}


def add_arguments(p):
    add_cluster_arguments(p)
    p.add_argument("--run-dir", default=None, help="where the script, logs and checkpoints go "
                                                    "(default runs/slurm-YYYYmmdd-HHMMSS)")
    p.add_argument("--array", metavar="GRID", default=None,
                   help="YAML list of runs {name, flags}: a job array, one run per task, each in RUN_DIR/NAME")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script; write and submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; non-zero exit if it did not complete")
    p.epilog = "Train flags (or --config FILE) follow `--`. submit adds --save/--load RUN_DIR/checkpoints --fresh-start."


def _parser():
    p = argparse.ArgumentParser(prog="megatron-simreg submit",
                                usage="megatron-simreg submit [options] -- <train flags or --config FILE>",
                                description="a multi-node SLURM job for megatron-simreg train, preemption-safe: "
                                            "it resumes from its last checkpoint when requeued")
    add_arguments(p)
    return p


def run_argv(argv) -> int:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        own, train_argv = argv[:i], argv[i + 1:]
    else:
        own, train_argv = argv, []
    args = _parser().parse_args(own)
    args.train_argv = train_argv
    return main(args)


def main(args) -> int:
    from ..slurm import submit as sub
    from ..slurm.script import JobSpec, passthrough_env, render

    train_argv = list(getattr(args, "train_argv", []) or [])
    run_dir = args.run_dir or os.path.join("runs", time.strftime("slurm-%Y%m%d-%H%M%S"))
    try:
        if args.array:
            grid = sub.load_grid(args.array)
            tasks = [sub.make_task(name, train_argv + flags) for name, flags in grid]
        else:
            tasks = [sub.make_task("", train_argv)]
        spec = JobSpec(run_dir=os.path.abspath(run_dir), tasks=tasks, env=passthrough_env(), array=bool(args.array),
                       **cluster_fields(args))
        spec.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        sys.stdout.write(render(spec))
        return 0
    try:
        script = sub.write(spec)
        job_id = sub.sbatch(script)
    except sub.SlurmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"submitted job {job_id}: script {script}; logs in {os.path.join(spec.run_dir, 'logs')}", flush=True)
    print(f"status: megatron-simreg status {spec.run_dir}", flush=True)
    if not args.wait:
        return 0
    states = sub.wait(job_id)
    report, done = sub.status(spec.run_dir)
    print(report)
    ok = bool(states) and all(s == "COMPLETED" for s in states.values())
    if not states:  # the job has left squeue/sacct/scontrol: judge by the checkpoints
        ok = done
    if not ok:
        print(f"error: job {job_id} did not complete ({' '.join(f'{k}:{v}' for k, v in sorted(states.items()))}); "
              f"see {os.path.join(spec.run_dir, 'logs')}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_argv(sys.argv[1:]))
