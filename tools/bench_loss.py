#!/usr/bin/env python
"""Benchmark SimReg implementations: forward+backward time and extra peak memory.

Each (impl, s, h) case runs in its own subprocess so that peak memory is the
case's own: on CPU the rise of the process's resident high-water mark
(``ru_maxrss``, with glibc's mmap threshold fixed at 64 KiB so freed
tensors leave the resident set) over its value once the inputs exist; on CUDA
``torch.cuda.max_memory_allocated`` over the same baseline. "Extra" therefore
counts everything the loss allocates, the input gradient included.

    python tools/bench_loss.py                       # CPU table of the issue
    python tools/bench_loss.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


# A fixed mmap threshold makes glibc return every large block to the OS when
# it is freed; otherwise its adaptive threshold keeps freed tensors in the
# heap and the resident high-water mark counts fragmentation, not live memory.
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def worker(impl: str, s: int, h: int, args) -> dict:
    import torch

    from megatron_simreg import simreg_loss

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(args.batch, s, h, generator=g).to(device=device, dtype=dtype).requires_grad_()
    # ~s/8 distinct labels: enough repeats that most tokens are anchors.
    labels = torch.randint(0, max(2, s // 8), (args.batch, s), generator=g).to(device)

    def step():
        hidden.grad = None
        simreg_loss(hidden, labels, impl=impl).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Load kernels and thread pools on a tiny input first, so their one-time
    # allocations do not count as the case's memory.
    tiny = torch.randn(1, 16, h, device=device, dtype=dtype, requires_grad=True)
    simreg_loss(tiny, torch.randint(0, 2, (1, 16), device=device), impl=impl).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "s": s, "h": h, "ms": 1e3 * statistics.median(times), "peak_mb": peak / 2**20}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--impls", nargs="+", default=["naive", "blockwise"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", nargs=3, metavar=("IMPL", "S", "H"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        impl, s, h = args.worker
        print(json.dumps(worker(impl, int(s), int(h), args)))
        return 0

    import torch

    import megatron_simreg

    print(f"# bench_loss: device={args.device} dtype={args.dtype} batch={args.batch} "
          f"torch={torch.__version__} megatron_simreg={megatron_simreg.__version__} threads={torch.get_num_threads()}")
    if args.device == "cuda":
        print(f"# gpu: {torch.cuda.get_device_name()}")
    print("| s | h | impl | fwd+bwd ms | extra peak MiB | time / naive | memory / naive |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    forward = [a for a in sys.argv[1:]]
    for s in args.seq:
        for h in args.hidden:
            ref = None
            for impl in args.impls:
                cmd = [sys.executable, os.path.abspath(__file__), *forward, "--worker", impl, str(s), str(h)]
                out = subprocess.run(cmd, capture_output=True, text=True, env=WORKER_ENV)
                if out.returncode != 0:
                    reason = "out of memory" if "out of memory" in out.stderr.lower() else out.stderr.strip().splitlines()[-1:]
                    print(f"| {s} | {h} | {impl} | failed: {reason} | | | |")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                ref = r if impl == "naive" else ref
                ratio_t = f"{r['ms'] / ref['ms']:.2f}" if ref else "-"
                ratio_m = f"{r['peak_mb'] / ref['peak_mb']:.3f}" if ref and ref["peak_mb"] > 0 else "-"
                print(f"| {s} | {h} | {impl} | {r['ms']:.1f} | {r['peak_mb']:.1f} | {ratio_t} | {ratio_m} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
