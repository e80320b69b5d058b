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
    python tools/bench_loss.py --device cuda --dtype bf16 --impls naive compiled blockwise triton --tflops

Implementations: ``naive``, ``blockwise``, ``triton`` (CUDA only) and
``compiled`` (``torch.compile`` of the naive version; compile time is not
timed: the first call at the case's shape is the untimed memory-measuring run).

``--tflops`` adds the achieved rate and its share of the device's measured
bf16 matmul peak (a timed 8192 x 8192 x 8192 ``torch.mm`` on CUDA). FLOPs
counted per case, whatever the impl: ``2 * b * s^2 * h`` for the forward
similarities plus ``3 * 2 * b * s^2 * h`` for a backward that recomputes them
(recompute, ``dS @ z`` for anchors, ``dS^T @ z`` for keys), i.e.
``8 * b * s^2 * h``. Naive does not recompute (6 of the 8 units), so for it the
column is a normalized speed rather than its own FLOP rate. Element-wise work
(exp, masks, normalization) is not counted.
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


def peak_bf16_tflops(device: str) -> float:
    """Measured bf16 matmul rate: median of 20 timed 8192^3 ``torch.mm`` after warm-up."""
    import torch

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def flops(s: int, h: int, batch: int) -> float:
    """Forward similarities plus a recomputing backward: (1 + 3) * 2 * b * s^2 * h."""
    return 8.0 * batch * s * s * h


def worker(impl: str, s: int, h: int, args) -> dict:
    import functools

    import torch

    from megatron_simreg import simreg_loss

    if impl == "compiled":
        # dynamic: one graph for every (s, h), so later cases hit the compile cache
        loss_fn = torch.compile(functools.partial(simreg_loss, impl="naive"), dynamic=True)
    else:
        loss_fn = functools.partial(simreg_loss, impl=impl)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(args.batch, s, h, generator=g).to(device=device, dtype=dtype).requires_grad_()
    # ~s/8 distinct labels: enough repeats that most tokens are anchors.
    labels = torch.randint(0, max(2, s // 8), (args.batch, s), generator=g).to(device)

    def step():
        hidden.grad = None
        loss_fn(hidden, labels).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Load kernels and thread pools on a tiny input first, so their one-time
    # allocations do not count as the case's memory.
    tiny = torch.randn(1, 16, h, device=device, dtype=dtype, requires_grad=True)
    loss_fn(tiny, torch.randint(0, 2, (1, 16), device=device)).backward()
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
    p.add_argument("--tflops", action="store_true", help="add TFLOP/s and %% of the measured bf16 matmul peak")
    p.add_argument("--worker", nargs=3, metavar=("IMPL", "S", "H"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        impl, s, h = args.worker
        if impl == "peak":
            print(json.dumps({"peak_tflops": peak_bf16_tflops(args.device)}))
            return 0
        print(json.dumps(worker(impl, int(s), int(h), args)))
        return 0

    import torch

    import megatron_simreg

    print(f"# bench_loss: device={args.device} dtype={args.dtype} batch={args.batch} "
          f"torch={torch.__version__} megatron_simreg={megatron_simreg.__version__} threads={torch.get_num_threads()}")
    forward = [a for a in sys.argv[1:]]
    peak = None
    if args.device == "cuda":
        import triton  # noqa: F401  (version line only; the triton impl needs it anyway)

        print(f"# gpu: {torch.cuda.get_device_name()} triton={triton.__version__}")
        if args.tflops:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), *forward, "--worker", "peak", "0", "0"],
                                 capture_output=True, text=True, env=WORKER_ENV)
            if out.returncode == 0:
                peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_tflops"]
                print(f"# measured bf16 matmul peak: {peak:.0f} TFLOP/s (8192^3 torch.mm, median of 20)")
    extra_head = " TFLOP/s | % of peak |" if args.tflops else ""
    print("| s | h | impl | fwd+bwd ms | extra peak MiB | time / naive | memory / naive |" + extra_head)
    print("|---:|---:|---|---:|---:|---:|---:|" + ("---:|---:|" if args.tflops else ""))
    for s in args.seq:
        for h in args.hidden:
            ref = None
            for impl in args.impls:
                cmd = [sys.executable, os.path.abspath(__file__), *forward, "--worker", impl, str(s), str(h)]
                out = subprocess.run(cmd, capture_output=True, text=True, env=WORKER_ENV)
                if out.returncode != 0:
                    reason = "out of memory" if "out of memory" in out.stderr.lower() else out.stderr.strip().splitlines()[-1:]
                    print(f"| {s} | {h} | {impl} | failed: {reason} | | | |" + (" | |" if args.tflops else ""))
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                ref = r if impl == "naive" else ref
                ratio_t = f"{r['ms'] / ref['ms']:.2f}" if ref else "-"
                ratio_m = f"{r['peak_mb'] / ref['peak_mb']:.3f}" if ref and ref["peak_mb"] > 0 else "-"
                extra = ""
                if args.tflops:
                    rate = flops(s, h, args.batch) / (r["ms"] / 1e3) / 1e12
                    extra = f" {rate:.3g} | " + (f"{100 * rate / peak:.0f}% |" if peak else "- |")
                print(f"| {s} | {h} | {impl} | {r['ms']:.1f} | {r['peak_mb']:.1f} | {ratio_t} | {ratio_m} |{extra}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
