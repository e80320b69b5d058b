"""``megatron-simreg status RUN_DIR``: a submitted run's SLURM state, last iteration and last metrics."""

import sys


def add_arguments(p):
    p.add_argument("run_dir", help="a run directory written by `megatron-simreg submit`")


def main(args) -> int:
    from ..slurm.submit import status

    try:
        report, _ = status(args.run_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    import argparse

    _p = argparse.ArgumentParser(prog="megatron-simreg status",
                                 description="a submitted run's SLURM state, last iteration and last metrics")
    add_arguments(_p)
    sys.exit(main(_p.parse_args()))
