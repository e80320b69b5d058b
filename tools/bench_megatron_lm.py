#!/usr/bin/env python
"""Step time of our trainer and of Megatron-LM's ``pretrain()`` on one CPU process, and SimReg's and JREG's
overhead inside Megatron-LM's loop.

Both train the same GPT (``--preset``) on the default corpus with its SentencePiece tokenizer, fp32, gloo, with the
same flags. Megatron-LM runs its own ``pretrain_gpt.py`` through ``examples/pretrain_gpt_simreg.py`` under the
test-only CPU shims (``tests/megatron_lm_cpu.py``; on a GPU run the launcher directly). A step's time is, for
Megatron-LM, its logged "elapsed time per iteration" (the whole iteration: data, forward/backward, optimizer,
logging); for our trainer, tokens per iteration / its logged ``tokens_per_sec`` (the train step: forward/backward
and optimizer). Medians over the iterations after ``--warmup``; ``--rounds`` repeats the variants interleaved, so a
slow spell of a shared machine hits every variant, and the table gives the median over rounds.

    python tools/bench_megatron_lm.py                      # needs Megatron-LM: MEGATRON_LM_PATH or ../shared/...
    python tools/bench_megatron_lm.py --rounds 3 --iters 30
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "megatron-lm-core_v0.16.1"
PRESETS = {
    "cpu-test": ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
                 "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "4"],  # its test
    "cpu-small": ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8", "--seq-length", "256",
                  "--max-position-embeddings", "256", "--micro-batch-size", "4", "--global-batch-size", "8"],
}
COMMON = ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--hidden-dropout", "0",
          "--attention-dropout", "0", "--lr", "1e-4", "--lr-warmup-iters", "0", "--lr-decay-style", "constant",
          "--seed", "1234", "--split", "100,0,0", "--tokenizer-type", "SentencePieceTokenizer"]
MEGATRON_LM_ONLY = ["--transformer-impl", "local", "--use-cpu-initialization", "--distributed-backend", "gloo",
                    "--no-gradient-accumulation-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
                    "--no-masked-softmax-fusion", "--no-rope-fusion", "--no-persist-layer-norm", "--disable-bias-linear",
                    "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "100000"]
SIMREG, JREG = ["--simreg-weight", "0.1"], ["--jreg-weight", "3.0"]
VARIANTS = {  # name -> (trainer, regularizer flags)
    "Megatron-LM": ("megatron-lm", []),
    "Megatron-LM + SimReg": ("megatron-lm", SIMREG),
    "Megatron-LM + JREG": ("megatron-lm", JREG),
    "Megatron-LM + both": ("megatron-lm", SIMREG + JREG),
    "megatron-simreg train": ("ours", []),
    "megatron-simreg train + both": ("ours", SIMREG + JREG),
}
ITER_MS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*elapsed time per iteration \(ms\): ([\d.]+)")


def megatron_lm_step_ms(flags, iters, warmup, megatron_lm, workdir):
    env = {**os.environ, "MEGATRON_LM_PATH": megatron_lm,
           "PYTHONPATH": os.pathsep.join([megatron_lm, str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(_port()), str(ROOT / "tests" / "megatron_lm_cpu.py"),
           str(ROOT / "examples" / "pretrain_gpt_simreg.py"), *MEGATRON_LM_ONLY, *flags, "--train-iters", str(iters)]
    out = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise SystemExit(f"Megatron-LM run failed ({out.returncode}):\n{(out.stdout + out.stderr)[-4000:]}")
    times = [float(ms) for it, ms in ITER_MS.findall(out.stdout) if int(it) > warmup]
    return statistics.median(times)


def ours_step_ms(flags, iters, warmup, workdir, tokens_per_iter):
    save = Path(workdir) / "ours"
    cmd = [sys.executable, "-m", "megatron_simreg.cli", "train", *flags, "--train-iters", str(iters),
           "--save", str(save), "--log-interval", "1", "--save-interval", "100000"]
    out = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise SystemExit(f"megatron-simreg train failed ({out.returncode}):\n{out.stderr[-4000:]}")
    records = [json.loads(line) for line in open(save / "metrics.jsonl") if '"tokens_per_sec"' in line]
    return statistics.median(1000 * tokens_per_iter / r["tokens_per_sec"] for r in records
                             if r["iteration"] > warmup)


def _port():
    from megatron_simreg.parallel.process import free_port

    return free_port()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--data-cache-path", default=os.path.join(os.path.expanduser("~"), ".cache", "megatron_simreg"),
                   help="where the default corpus is prepared (as megatron-simreg train's flag)")
    a = p.parse_args()
    megatron_lm = os.environ.get("MEGATRON_LM_PATH") or (str(FIXTURE) if FIXTURE.is_dir() else None)
    if megatron_lm is None:
        raise SystemExit("Megatron-LM not found: set MEGATRON_LM_PATH to a checkout (core_v0.16.x)")
    from megatron_simreg.data.default_corpus import prepare_default_corpus

    prefix, model = prepare_default_corpus(a.data_cache_path)
    shape = PRESETS[a.preset]
    tokens_per_iter = int(shape[shape.index("--global-batch-size") + 1]) * int(shape[shape.index("--seq-length") + 1])
    data = ["--data-path", prefix, "--tokenizer-model", model]
    times = {v: [] for v in a.variants}
    for _ in range(a.rounds):
        for name in a.variants:
            trainer, reg = VARIANTS[name]
            with tempfile.TemporaryDirectory() as work:
                if trainer == "megatron-lm":
                    ms = megatron_lm_step_ms([*shape, *COMMON, *data, *reg], a.iters, a.warmup, megatron_lm, work)
                else:
                    ms = ours_step_ms([*shape, *COMMON, *data, *reg], a.iters, a.warmup, work, tokens_per_iter)
            times[name].append(ms)
            print(f"# {name}: {ms:.1f} ms", file=sys.stderr, flush=True)
    base = statistics.median(times["Megatron-LM"]) if "Megatron-LM" in times else None
    print(f"| variant ({a.preset}, {a.iters} iterations, median after {a.warmup}, {a.rounds} round(s)) "
          "| step time (ms) | vs Megatron-LM |")
    print("|---|---|---|")
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"| {name} | {ms:.1f} | {f'{ms / base:.3f}x' if base else ''} |")


if __name__ == "__main__":
    main()
