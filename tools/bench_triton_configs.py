#!/usr/bin/env python
"""Launch configurations of the Triton SimReg kernel: time, FLOP rate and compiler resource use.

Sweeps the forward and the backward kernel separately over the cartesian
product of the given tile sizes, warps and pipeline stages (forward also over
key splits) on one ``[b, s, h]`` input of self keys with raw states
(``norm_eps`` set, as the Megatron path calls it). For each configuration it
prints:

* the median time of the forward, or of the backward alone (the forward is
  run once with the default configuration, the backward timed with
  ``retain_graph``);
* the FLOP rate, counting ``2 b s^2 h`` for the forward and ``3 * 2 b s^2 h``
  for the recomputing backward (its Triton kernel plus two GEMMs), and its
  share of the measured bf16 matmul peak;
* registers per thread, spilled bytes and shared memory of the compiled
  kernel (from Triton's ``CompiledKernel``; ``-`` under the interpreter);
* the largest error of the per-token values (forward) or of the gradient
  (backward) against naive SimReg in fp32 (against the default configuration
  when ``b s^2`` is too large for naive's ``[b, s, s]`` matrices).

A configuration the GPU cannot hold (shared memory) is reported as such.

    python tools/bench_triton_configs.py --seq 8192 --hidden 2048                 # H100 / H200
    TRITON_INTERPRET=1 python tools/bench_triton_configs.py --device cpu --seq 40 --hidden 24 \\
        --block-m 16 --block-n 16 --block-k 16 --warps 4 --stages 1 --dtype fp32   # correctness only
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loss import peak_bf16_tflops  # noqa: E402

NAIVE_MAX_ELEMS = 1 << 28  # b * s^2 up to which the naive reference is affordable


def timed(fn, repeats: int, cuda: bool) -> float:
    """Median seconds of ``fn()`` after one warm-up call (which also compiles)."""
    import torch

    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def resources(kernel) -> str:
    """``regs / spilled bytes / shared KiB`` of a compiled Triton kernel."""
    if kernel is None or getattr(kernel, "n_regs", None) is None:
        return "- | - | -"
    return f"{kernel.n_regs} | {kernel.n_spills} | {kernel.metadata.shared / 1024:.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--device", default="cuda", help="cuda, or cpu under TRITON_INTERPRET=1 (correctness only)")
    ap.add_argument("--block-m", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--block-n", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--block-k", type=int, nargs="+", default=[64])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--splits", nargs="+", default=["auto", "all"],
                    help="forward key splits: auto (the kernel's rule), all (one key block per program) or numbers")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--device cpu needs TRITON_INTERPRET=1 in the environment (Triton's CPU interpreter)")

    import torch
    import triton

    from megatron_simreg.kernels import simreg_triton as kt
    from megatron_simreg.losses.simreg import NORM_EPS, naive_simreg, normalize

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU, or pass --device cpu with TRITON_INTERPRET=1")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    b, s, h = args.batch, args.seq, args.hidden
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, s, h, generator=g).to(args.device, dtype).requires_grad_()
    y = torch.randint(0, max(2, s // 8), (b, s), generator=g).to(args.device)
    v = torch.ones(b, s, dtype=torch.bool, device=args.device)
    p = torch.arange(s, device=args.device)
    grad_out = torch.rand(b, s, generator=g).to(args.device)
    tau = 0.1

    def forward(fwd=None, bwd=None):
        return kt.TritonSimReg.apply(x, None, y, None, v, None, p, None, None, None, tau, None, NORM_EPS, fwd or {},
                                     bwd or {})[0]

    def gradient(per_token):
        return torch.autograd.grad(per_token, x, grad_out, retain_graph=True)[0]

    if b * s * s <= NAIVE_MAX_ELEMS:
        ref_name = "naive fp32"
        xf = x.detach().float().requires_grad_()
        z = normalize(xf, NORM_EPS)
        ref_val = naive_simreg(z, y, v, p, z, y, v, p, tau, None).per_token
        ref_grad = torch.autograd.grad(ref_val, xf, grad_out)[0]
    else:
        ref_name = "default configuration"
        ref_val = forward()
        ref_grad = gradient(ref_val)
    ref_val, ref_grad = ref_val.detach(), ref_grad.float()

    peak = peak_bf16_tflops(args.device) if cuda else None
    device_name = torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET=1)"
    print(f"# bench_triton_configs: b={b} s={s} h={h} {args.dtype} device={device_name} torch={torch.__version__} "
          f"triton={triton.__version__}; errors against {ref_name}")
    if peak:
        print(f"# measured bf16 matmul peak: {peak:.0f} TFLOP/s (8192^3 torch.mm, median of 20)")
    unit = 2.0 * b * s * s * h

    def rate(seconds, units):
        tflops = units * unit / seconds / 1e12
        return f"{tflops:.0f} | {100 * tflops / peak:.0f}%" if peak else f"{tflops:.3g} | -"

    tiles = list(itertools.product(args.block_m, args.block_n, args.block_k, args.warps, args.stages))
    print("\nForward kernel (per-token values; error = max abs)")
    print("| block_m | block_n | block_k | warps | stages | splits | ms | TFLOP/s | % of peak | regs | spills B "
          "| shared KiB | error |")
    print("|" + "---:|" * 13)
    for (bm, bn, bk, warps, stages), splits in itertools.product(tiles, args.splits):
        n_splits = None if splits == "auto" else triton.cdiv(s, bn) if splits == "all" else int(splits)
        cfg = dict(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, num_splits=n_splits)
        head = f"| {bm} | {bn} | {bk} | {warps} | {stages} | {splits} |"
        try:
            with torch.no_grad():
                sec = timed(lambda: forward(fwd=cfg), args.repeats, cuda)
                err = (forward(fwd=cfg) - ref_val).abs().max().item()
        except triton.runtime.errors.OutOfResources as e:
            print(f"{head} out of resources: {e} |||||||", flush=True)
            continue
        print(f"{head} {1e3 * sec:.2f} | {rate(sec, 1)} | {resources(kt.LAST_LAUNCH.get('fwd'))} | {err:.1e} |",
              flush=True)

    print("\nBackward alone (Triton tile kernel + 2 GEMMs per slab; error = max abs / max |reference grad|)")
    print("| block_m | block_n | block_k | warps | stages | ms | TFLOP/s | % of peak | regs | spills B | shared KiB "
          "| error |")
    print("|" + "---:|" * 12)
    scale = ref_grad.abs().max().item() or 1.0
    for bm, bn, bk, warps, stages in tiles:
        cfg = dict(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
        head = f"| {bm} | {bn} | {bk} | {warps} | {stages} |"
        try:
            per_token = forward(bwd=cfg)
            sec = timed(lambda: gradient(per_token), args.repeats, cuda)
            err = (gradient(per_token).float() - ref_grad).abs().max().item() / scale
        except triton.runtime.errors.OutOfResources as e:
            print(f"{head} out of resources: {e} ||||||", flush=True)
            continue
        print(f"{head} {1e3 * sec:.2f} | {rate(sec, 3)} | {resources(kt.LAST_LAUNCH.get('bwd'))} | {err:.1e} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
