#!/usr/bin/env python
"""Step time and peak memory of a GPTModel with and without SimReg / JREG.

One process (world size 1; gloo on CPU, NCCL on GPU). Each variant runs in its
own subprocess so peak memory is its own: on CPU the rise of ``ru_maxrss``
over the built model, on GPU ``torch.cuda.max_memory_allocated``. A step is
forward + backward over the micro-batches through Megatron's
``get_forward_backward_func`` (no optimizer), median of ``--iters`` after
``--warmup``; ``--rounds R`` repeats the variants R times, interleaved, and
reports medians (a shared machine's slow spells then hit every variant).

``--profile K`` also profiles one step per variant (``torch.profiler``) and
prints, for each regularized variant, what the regularizer adds: the
operators whose call count differs from the baseline's, their total calls and
self time, and the K costliest (device time on a GPU, host time always, so
host-side syncs such as ``aten::item`` show too).

    python tools/bench_megatron.py                        # CPU tiny config
    python tools/bench_megatron.py --preset gpu-1b        # 1B-class, seq 4096, bf16, on a GPU
    python tools/bench_megatron.py --preset gpu-1b --variants baseline simreg --profile 15
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

PRESETS = {
    "cpu-test": dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=512, seq_length=128,
                     micro_batch_size=2, num_microbatches=2, dtype="fp32"),  # the tool's own test
    "cpu-tiny": dict(num_layers=4, hidden_size=256, num_attention_heads=8, vocab_size=4096, seq_length=512,
                     micro_batch_size=4, num_microbatches=1, dtype="fp32"),
    "gpu-small": dict(num_layers=8, hidden_size=1024, num_attention_heads=16, vocab_size=32768, seq_length=2048,
                      micro_batch_size=4, num_microbatches=1, dtype="bf16"),
    # ~1.2B parameters: 24 x 2048, Llama-style SwiGLU MLP
    "gpu-1b": dict(num_layers=24, hidden_size=2048, num_attention_heads=16, vocab_size=32768, seq_length=4096,
                   micro_batch_size=1, num_microbatches=1, dtype="bf16", ffn_hidden_size=5632),
}
VARIANTS = ("baseline", "simreg", "jreg", "simreg+jreg")
# glibc: return freed blocks to the OS so ru_maxrss tracks live memory (see bench_loss.py)
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def worker(args) -> dict:
    import torch
    import torch.distributed as dist

    on_gpu = torch.cuda.is_available()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=0, world_size=1)
    if not on_gpu:
        from megatron_simreg.megatron.cpu_compat import apply_cpu_adaptations

        apply_cpu_adaptations()
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_simreg import JRegConfig, SimRegConfig
    from megatron_simreg.megatron import apply_to_megatron, begin_step, count_step_anchors
    from megatron_simreg.megatron.model import GPTShape, build_gpt, transformer_config

    p = args.preset
    ps.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    shape = GPTShape(num_layers=p["num_layers"], hidden_size=p["hidden_size"], ffn_hidden_size=p.get("ffn_hidden_size"),
                     num_attention_heads=p["num_attention_heads"], vocab_size=p["vocab_size"],
                     seq_length=p["seq_length"])
    dtype = torch.bfloat16 if p["dtype"] == "bf16" else torch.float32
    model = build_gpt(shape, transformer_config(shape, dtype=dtype))
    simreg = SimRegConfig(weight=0.1, impl=args.impl) if "simreg" in args.variant else None
    jreg = JRegConfig() if "jreg" in args.variant else None
    if simreg or jreg:
        apply_to_megatron(simreg=simreg, jreg=jreg, every_token_counts=True)  # random tokens: no mask
    device = "cuda" if on_gpu else "cpu"
    b, s, m = p["micro_batch_size"], p["seq_length"], p["num_microbatches"]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape.vocab_size, (m, b, s + 1), generator=g).to(device)
    pos = torch.arange(s, device=device).expand(b, s)

    def forward_step(it, model):
        batch = next(it)
        x, y = batch[:, :-1], batch[:, 1:]
        out = model(x, pos, None, labels=y)
        return out, lambda t: (t.float().sum() / t.numel(), {"lm": t.detach().float().mean()})

    fb = get_forward_backward_func()

    def step():
        if simreg:
            begin_step(num_anchors=count_step_anchors(list(tokens[:, :, 1:]), None, simreg))  # on the device
        model.zero_grad(set_to_none=True)
        fb(forward_step_func=forward_step, data_iterator=iter(tokens), model=[model], num_microbatches=m,
           seq_length=s, micro_batch_size=b, forward_only=False)
        if on_gpu:
            torch.cuda.synchronize()

    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    ops = profile_ops(step, on_gpu) if args.profile else None
    dist.destroy_process_group()
    params = sum(x.numel() for x in model.parameters())
    return {"variant": args.variant, "ms": 1e3 * statistics.median(times), "peak_mib": (peak - base) / 2**20,
            "params": params, "ops": ops}


def profile_ops(step, on_gpu: bool) -> dict:
    """``{op name: [calls, self host us, self device us]}`` over one profiled step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        step()
    ops = {}
    for e in prof.key_averages():
        device_us = getattr(e, "self_device_time_total", None)
        if device_us is None:  # torch < 2.4
            device_us = getattr(e, "self_cuda_time_total", 0)
        ops[e.key] = [e.count, e.self_cpu_time_total, device_us if on_gpu else 0.0]
    return ops


def print_profile_deltas(base: dict, r: dict, k: int, on_gpu: bool) -> None:
    """The regularizer's operators: those called more (or less) often than in ``base``, by added self time.

    Operators whose call count is unchanged (the model's own) are left out: on a
    shared machine their time moves by more than the regularizer costs.
    """
    col = 2 if on_gpu else 1
    zero = [0, 0.0, 0.0]
    rows = []
    for name in set(base["ops"]) | set(r["ops"]):
        a, b = base["ops"].get(name, zero), r["ops"].get(name, zero)
        if b[0] != a[0]:
            rows.append((b[col] - a[col], name, b[0] - a[0], b[1] - a[1], b[2] - a[2]))
    rows.sort(reverse=True)
    calls = sum(row[2] for row in rows)
    host, dev = sum(row[3] for row in rows) / 1e3, sum(row[4] for row in rows) / 1e3
    print(f"\n{r['variant']} vs baseline, one profiled step: {calls:+d} operator calls, {host:+.2f} ms self host time"
          + (f", {dev:+.2f} ms self device time" if on_gpu else "")
          + f" in operators whose call count changed; the top {k}:")
    print("| operator | calls | self host ms |" + (" self device ms |" if on_gpu else ""))
    print("|---|---:|---:|" + ("---:|" if on_gpu else ""))
    for _, name, n, h, d in rows[:k]:
        print(f"| `{name[:60]}` | {n:+d} | {h / 1e3:+.2f} |" + (f" {d / 1e3:+.2f} |" if on_gpu else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-tiny", choices=sorted(PRESETS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--impl", default="auto", choices=["auto", "naive", "blockwise", "triton"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="run the variants this many times, interleaved")
    ap.add_argument("--profile", type=int, default=0, metavar="K",
                    help="profile one step per variant; print what each regularizer adds over the baseline "
                         "(operators whose call count changed, the K costliest)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=29511, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.profile and "baseline" not in args.variants:
        ap.error("--profile compares with the baseline: include 'baseline' in --variants")
    if args.worker:
        args.variant, args.preset = args.worker, PRESETS[args.preset]
        print(json.dumps(worker(args)))
        return 0

    import torch

    p = PRESETS[args.preset]
    print(f"# bench_megatron: preset={args.preset} {p} impl={args.impl} torch={torch.__version__} "
          f"device={torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'} threads={torch.get_num_threads()}")
    runs = {v: [] for v in args.variants}
    errors = {}
    for _ in range(args.rounds):  # interleaved, so that a slow spell of the machine hits every variant
        for i, v in enumerate(args.variants):
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", v, "--port", str(29511 + i)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=WORKER_ENV)
            if out.returncode != 0:
                errors[v] = out.stderr.strip().splitlines()[-1:]
                continue
            runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.rounds > 1:
        print(f"# {args.rounds} rounds: step ms is the median over rounds, overhead the median of each round's "
              "ratio to that round's baseline")
    print("| variant | step ms | overhead vs baseline | extra peak MiB |")
    print("|---|---:|---:|---:|")
    base_runs = runs.get("baseline", [])
    for v, rs in runs.items():
        if v in errors:
            print(f"| {v} | failed: {errors[v]} | | |")
            continue
        ratios = [r["ms"] / b["ms"] - 1 for r, b in zip(rs, base_runs)]
        over = f"{100 * statistics.median(ratios):+.1f}%" if len(ratios) == len(rs) else "-"
        print(f"| {v} | {statistics.median(r['ms'] for r in rs):.1f} | {over} | {max(r['peak_mib'] for r in rs):.0f} |")
    base = base_runs[0] if base_runs and "baseline" not in errors else None
    results = [rs[0] for v, rs in runs.items() if rs and v not in errors]
    if args.profile and base is not None:
        for r in results:
            if r is not base:
                print_profile_deltas(base, r, args.profile, torch.cuda.is_available())
    return 0


if __name__ == "__main__":
    sys.exit(main())
