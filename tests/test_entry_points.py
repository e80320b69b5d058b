"""The demo, the example and the benchmark run (tiny sizes; they are smoke tests, not timings)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd):
    out = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_cli_demo_tiny():
    out = run("-m", "megatron_simreg.cli", "demo", "--train-iters", "3", "--seq-length", "32",
              "--micro-batch-size", "4", "--hidden-size", "32", "--num-layers", "2", "--corpus-bytes", "50000")
    rows = [line for line in out.splitlines() if line.startswith(("baseline", "simreg", "jreg"))]
    assert len(rows) == 3


def test_cli_without_command_prints_help():
    out = subprocess.run([sys.executable, "-m", "megatron_simreg.cli"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "demo" in out.stdout


def test_example_runs():
    assert "step 4" in run("examples/simreg_jreg_in_a_training_step.py")


def test_bench_loss_runs():
    out = run("tools/bench_loss.py", "--seq", "64", "--hidden", "16", "--repeats", "1")
    assert "| 64 | 16 | naive |" in out and "| 64 | 16 | blockwise |" in out
