#!/usr/bin/env python
"""Two methods of a finished ``compare`` grid against each other, paired by seed (the report pairs each with the
baseline only).

    python tools/compare_methods.py runs/doc-scope-code/results.json simreg-document simreg-sequence

Per model and seed: each method's final validation loss and their difference (A - B), then the mean difference with
its 95% t-interval over the seeds (``megatron_simreg.compare.statistics.paired_interval``, as the report computes
its intervals). Runs of one seed share initial weights, data order and validation batches, so the difference
cancels most of what the seeds share.
"""

from __future__ import annotations

import argparse
import json
import sys


def paired_finals(results: dict, a: str, b: str) -> dict:
    """``{model: [(seed, final_a, final_b), ...]}`` over the seeds where both runs finished."""
    from collections import defaultdict

    runs = results["runs"]
    out = defaultdict(list)
    for model in results["models"]:
        for seed in results["seeds"]:
            ra, rb = runs.get(f"{model}.{a}.s{seed}"), runs.get(f"{model}.{b}.s{seed}")
            if ra and rb and ra.get("final_val_loss") is not None and rb.get("final_val_loss") is not None:
                out[model].append((seed, ra["final_val_loss"], rb["final_val_loss"]))
    return dict(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="OUT/results.json of megatron-simreg compare")
    p.add_argument("a", help="method A (the difference is A - B)")
    p.add_argument("b", help="method B")
    args = p.parse_args(argv)

    from megatron_simreg.compare.statistics import format_interval, paired_interval, verdict

    with open(args.results) as f:
        results = json.load(f)
    for name in (args.a, args.b):
        if name not in results["methods"]:
            p.error(f"{name!r} is not a method of this grid: {', '.join(results['methods'])}")
    for model, rows in paired_finals(results, args.a, args.b).items():
        print(f"{model}: final validation loss, {args.a} - {args.b}")
        for seed, fa, fb in rows:
            print(f"  seed {seed}: {fa:.4f} - {fb:.4f} = {fa - fb:+.4f}")
        ci = paired_interval([fa - fb for _, fa, fb in rows])
        print(f"  mean {format_interval(ci, label=True)}, n={ci['n']}: {verdict(ci)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
