"""``megatron-simreg compare``: baseline vs SimReg vs JREG over models and seeds, with a report.

    megatron-simreg compare --grid examples/compare_tiny.yaml --out runs/compare-tiny
    megatron-simreg compare --grid examples/compare_dense_moe_gpu.yaml --out runs/cmp \\
        --slurm --nodes 1 --gpus-per-node 8 --partition gpu --time 24:00:00

Trains the grid's unfinished runs (here one after another, or as a SLURM job array), then evaluates
every finished run (validation curve, tokens-to-target and speed-up, zero-shot accuracy with
lm-evaluation-harness on the HF export, representation and layer-jump analysis) and writes
``OUT/report.md``, its plots and ``OUT/results.json``. Rerunning the command skips what is done,
resumes interrupted runs, and reports whatever has finished.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .submit import add_cluster_arguments

    p.add_argument("--grid", required=True, help="grid YAML (see examples/compare_tiny.yaml)")
    p.add_argument("--out", required=True, help="output directory: runs/, report.md, plots, results.json")
    p.add_argument("--device", default=None, help="device for the zero-shot and hidden-state analysis "
                                                  "(default: cuda when available, else cpu)")
    p.add_argument("--report-only", action="store_true", help="train nothing; evaluate and report the finished runs")
    p.add_argument("--dry-run", action="store_true",
                   help="print the runs and their train commands (with --slurm: the sbatch script); run nothing")
    g = p.add_argument_group("SLURM (with --slurm; without it, runs train here one after another and "
                             "--nproc-per-node sets the processes of each)")
    g.add_argument("--slurm", action="store_true", help="train the unfinished runs as one SLURM job array")
    g.add_argument("--wait", action="store_true", help="with --slurm: wait for the job, then evaluate and report")
    add_cluster_arguments(g)


def main(args) -> int:
    from ..compare import evaluate, report, runner, summary
    from ..compare.grid import GridError, load_grid
    from .submit import cluster_fields

    try:
        grid = load_grid(args.grid)
    except GridError as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:  # writes nothing
        if args.slurm:
            try:
                runner.submit_slurm(grid, args.out, cluster_fields(args), dry_run=True)
            except ValueError as e:
                print(f"compare: error: {e}", file=sys.stderr)
                return 2
            return 0
        for run in grid.runs:
            st, it = runner.state(args.out, run)
            print(f"{run.name} [{st}{'' if it is None else f' at iteration {it}'}]\n  "
                  + " ".join(runner.train_command(args.out, run, args.nproc_per_node or 1)[3:]))
        return 0
    os.makedirs(args.out, exist_ok=True)
    if os.path.abspath(args.grid) != os.path.abspath(os.path.join(args.out, "grid.yaml")):
        shutil.copyfile(args.grid, os.path.join(args.out, "grid.yaml"))  # the record of what was run
    try:
        if args.slurm and not args.report_only:
            job = runner.submit_slurm(grid, args.out, cluster_fields(args))
            if job is not None and not args.wait:
                print(f"rerun this command when job {job} has ended to evaluate and report")
                return 0
            if job is not None:
                from ..slurm.submit import wait

                wait(job)
        elif not args.report_only:
            runner.train_all(grid, args.out, nproc_per_node=args.nproc_per_node or 1)
    except (GridError, ValueError, RuntimeError) as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 1

    from ..conversion.layout import ConversionError
    from ..training.checkpoint import CheckpointError

    device = args.device or ("cuda" if _cuda() else "cpu")
    evals = {}
    try:
        for run in grid.runs:
            ev = evaluate.evaluate_run(grid, args.out, run, device=device)
            if ev is not None:
                evals[run.name] = ev
    except (ValueError, ConversionError, CheckpointError) as e:  # the evaluations done so far are kept
        print(f"compare: error: evaluating {run.name}: {e}", file=sys.stderr)
        return 1
    missing = [r.name for r in grid.runs if r.name not in evals]
    runs = summary.per_run(grid, evals)
    agg = summary.summarize(grid, runs)
    leak = evaluate.data_contamination(grid)
    report.write_results(args.out, grid, runs, agg, missing, contamination=leak)
    report.write_plots(args.out, agg)
    path = report.write_report(args.out, grid, agg, missing, contamination=leak)
    print(open(path).read().split("## Convergence", 1)[1].split("![", 1)[0].strip())
    print(f"\nreport:  {path}\nresults: {os.path.join(args.out, 'results.json')}")
    if missing:
        print(f"unfinished: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
