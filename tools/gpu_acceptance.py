"""The GPU path users take, checked end to end on one GPU: prints PASS or FAIL per check.

Run it through ``bash tools/gpu_acceptance.sh`` (sets up .venv first). Meant
for one H100/H200 in under 10 minutes (unverified on GPU: it has not run on
one yet); TransformerEngine's layer spec is used when
it is importable (the trainer picks it). Checks:

1. train: bf16 + distributed optimizer (+ TE spec) with SimReg and JREG; the
   losses are finite and the LM loss falls.
2. resume: a second run is SIGKILLed after a checkpoint and resumed; every
   iteration after the resume logs the uninterrupted run's losses.
3. no-load-optim: run 1 exported to HF, imported back, trained with
   ``--load --no-load-optim --lr 0`` for 2 iterations: both logged losses
   equal the HF model's loss on the same batches (iteration 2 catches fp32
   main parameters that were not reloaded from the checkpoint).
4. recompute: ``--recompute-granularity full`` with JREG is refused with a
   reason, or logs the same losses as run 1.
5. TE norms: every norm gain of a freshly initialized model is 1.

``--cpu-smoke`` runs the same checks on a tiny model on CPU (gloo), which is
how CI keeps this script working; it proves nothing about GPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_MODEL = ["--num-layers", "4", "--hidden-size", "512", "--num-attention-heads", "8", "--num-query-groups", "4",
             "--seq-length", "1024", "--micro-batch-size", "4", "--global-batch-size", "16"]
CPU_MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
             "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4"]
COMMON = ["--swiglu", "--bf16", "--use-distributed-optimizer", "--lr", "2e-3", "--min-lr", "2e-4",
          "--lr-warmup-iters", "2", "--log-interval", "1", "--simreg-weight", "0.1", "--jreg-weight", "1.0"]
# Deterministic kernels, so that a resumed run can be compared exactly.
ENV = {"NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONUNBUFFERED": "1"}


class Acceptance:
    def __init__(self, out: Path, cpu_smoke: bool, data_cache: "str | None" = None):
        self.out, self.cpu_smoke = out, cpu_smoke
        self.model = CPU_MODEL if cpu_smoke else GPU_MODEL
        self.iters = 8 if cpu_smoke else 40
        self.save_interval = 4 if cpu_smoke else 10
        self.results = []
        self.cache = data_cache or str(out / "data_cache")

    # ------------------------------------------------------------------ helpers
    def cli(self, *argv, check=True, timeout=900, popen=False):
        cmd = [sys.executable, "-m", "megatron_simreg.cli", *argv]
        env = {**os.environ, **ENV}
        if popen:
            return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:1])} exited {out.returncode}:\n{out.stdout[-3000:]}\n"
                               f"{out.stderr[-3000:]}")
        return out

    def train_flags(self, *extra):
        return ["train", *self.model, *COMMON, "--train-iters", str(self.iters), "--data-cache-path", self.cache,
                *extra]

    @staticmethod
    def metrics(save) -> dict:
        """iteration -> its record in ``metrics.jsonl`` (a resumed run keeps each iteration once)."""
        with open(Path(save) / "metrics.jsonl") as f:
            rows = [json.loads(line) for line in f]
        return {r["iteration"]: r for r in rows}

    def check(self, name, fn):
        t0 = time.time()
        try:
            ok, detail = fn()
        except Exception as e:  # noqa: BLE001 - a crashed check is a FAIL with its message
            ok, detail = False, f"{type(e).__name__}: {e}"
        verdict = "PASS" if ok else "FAIL"
        self.results.append((name, verdict))
        print(f"{verdict} {name} ({time.time() - t0:.0f} s): {detail}", flush=True)

    # ------------------------------------------------------------------ checks
    def train(self):
        save = self.out / "train"
        self.cli(*self.train_flags("--save", str(save), "--save-interval", str(self.save_interval)))
        rows = self.metrics(save)
        first, last = rows[1], rows[self.iters]
        keys = ("lm_loss", "simreg_loss", "jreg_loss")
        finite = all(math.isfinite(r[k]) for r in rows.values() for k in keys)
        falls = last["lm_loss"] < first["lm_loss"]
        return finite and falls, (f"lm_loss {first['lm_loss']:.4f} -> {last['lm_loss']:.4f}, simreg "
                                  f"{last['simreg_loss']:.4f}, jreg {last['jreg_loss']:.4g}, "
                                  f"{last.get('tokens_per_sec', 0):.0f} tokens/s, te={_te_available()}")

    def resume(self):
        ref = self.metrics(self.out / "train")
        save = self.out / "killed"
        proc = self.cli(*self.train_flags("--save", str(save), "--save-interval", str(self.save_interval)),
                        popen=True)
        kill_after = self.save_interval + 1  # a checkpoint exists, and the run is past it
        killed = False
        while proc.poll() is None:
            log = save / "metrics.jsonl"
            if log.exists() and any(json.loads(line)["iteration"] > kill_after for line in log.read_text().splitlines()
                                    if line.strip()):
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.01)
        proc.wait()
        if not killed:
            return False, "inconclusive: the run finished before it could be killed"
        self.cli(*self.train_flags("--save", str(save), "--load", str(save), "--save-interval",
                                   str(self.save_interval)))
        got = self.metrics(save)
        worst = max(abs(got[i]["lm_loss"] - ref[i]["lm_loss"]) / abs(ref[i]["lm_loss"])
                    for i in range(1, self.iters + 1))
        return worst <= 1e-5, f"killed after iteration > {kill_after}; max relative lm_loss difference {worst:.2e}"

    def no_load_optim(self):
        hf, ck, cont = self.out / "hf", self.out / "imported", self.out / "continued"
        self.cli("export-hf", "--load", str(self.out / "train"), "--out", str(hf))
        self.cli("import-hf", "--hf", str(hf), "--save", str(ck), "--seq-length", self.model[self.model.index(
            "--seq-length") + 1])
        flags = self.train_flags("--load", str(ck), "--no-load-optim", "--save", str(cont))
        flags = _set(flags, "--train-iters", "2")
        flags = _set(_set(_set(flags, "--lr", "0"), "--min-lr", "0"), "--lr-warmup-iters", "0")
        self.cli(*flags)
        got = self.metrics(cont)
        want = _in_subprocess("_hf_losses", [str(hf), *flags[1:]])
        rel = [abs(got[i + 1]["lm_loss"] - want[i]) / want[i] for i in range(2)]
        tol = 2e-2  # bf16 Megatron vs fp32 transformers
        return max(rel) <= tol, (f"train {got[1]['lm_loss']:.4f}, {got[2]['lm_loss']:.4f} vs HF "
                                 f"{want[0]:.4f}, {want[1]:.4f} (relative {max(rel):.2e}, tolerance {tol})")

    def recompute(self):
        save = self.out / "recompute"
        out = self.cli(*self.train_flags("--save", str(save), "--recompute-granularity", "full",
                                         "--recompute-method", "uniform", "--recompute-num-layers", "1"),
                       check=False)
        if out.returncode == 2 and "recompute" in out.stderr:
            return True, "refused: " + out.stderr.strip().splitlines()[-1]
        if out.returncode != 0:
            return False, f"exit {out.returncode}: {out.stderr.strip()[-500:]}"
        ref, got = self.metrics(self.out / "train"), self.metrics(save)
        worst = max(abs(got[i][k] - ref[i][k]) / max(abs(ref[i][k]), 1e-6)
                    for i in range(1, self.iters + 1) for k in ("lm_loss", "jreg_loss", "simreg_loss"))
        return worst <= 1e-2, f"trains; max relative difference to the run without recompute {worst:.2e}"

    def te_norms(self):
        gains = _in_subprocess("_norm_gains", self.train_flags()[1:])
        bad = [n for n, ok in gains.items() if not ok]
        te = sum("layer_norm_weight" in n for n in gains)
        return bool(gains) and not bad, f"{len(gains)} norm gains ({te} TE fused), not 1: {bad or 'none'}"

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.check("train: bf16 + distributed optimizer" + (" + TE" if _te_available() else "") + " with SimReg+JREG",
                   self.train)
        self.check("resume after SIGKILL continues the uninterrupted run", self.resume)
        self.check("--no-load-optim from an imported HF model keeps its weights", self.no_load_optim)
        self.check("full recompute with JREG refused or exact", self.recompute)
        self.check("norm gains start at 1", self.te_norms)
        failed = [n for n, v in self.results if v == "FAIL"]
        print(f"\n{len(self.results) - len(failed)}/{len(self.results)} checks passed"
              + (" (CPU smoke run: says nothing about GPUs)" if self.cpu_smoke else ""))
        return 1 if failed else 0


def _in_subprocess(name, argv):
    """``name(argv)`` of this module run in a fresh process (it starts torch.distributed), its JSON result."""
    code = f"import sys, json; from tools.gpu_acceptance import {name}; print(json.dumps({name}(sys.argv[1:])))"
    out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, **ENV}, timeout=900)
    if out.returncode:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _set(flags, name, value):
    """``flags`` with ``name`` set to ``value`` (argparse keeps a flag's last occurrence)."""
    return [*flags, name, value]


def _te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _norm_gains(train_argv) -> dict:
    """{parameter name: whether it is all ones} for every norm gain of a freshly built and initialized model."""
    import torch

    from megatron_simreg.training.args import parse_train_args

    args = parse_train_args(train_argv)
    from megatron_simreg.megatron.param_names import NORM, param_role
    from megatron_simreg.parallel.process import init_distributed
    from megatron_simreg.training.model_setup import build_model, padded_vocab

    init_distributed()
    if not torch.cuda.is_available():
        from megatron_simreg.megatron.cpu_compat import apply_cpu_adaptations

        apply_cpu_adaptations()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_simreg.megatron.init import init_params_by_global_name

    ps.initialize_model_parallel()
    model_parallel_cuda_manual_seed(args.seed)
    model, config = build_model(args, padded_vocab(4096, args))
    init_params_by_global_name(model, seed=args.seed, std=config.init_method_std, num_layers=args.num_layers)
    return {n: bool((p.float() == 1).all()) for n, p in model.named_parameters() if param_role(n) == NORM}


def _hf_losses(argv, iterations: int = 2) -> list:
    """``argv = [hf_dir, *train flags]``: the transformers model's mean LM loss on each of the trainer's first
    global batches."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_simreg.training.args import parse_train_args

    hf_dir, args = argv[0], parse_train_args(argv[1:])
    samples = _trainer_batches(args, iterations)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    out = []
    for batch in samples:
        total = count = 0.0
        for mb in batch:
            with torch.no_grad():
                logits = model(mb["tokens"].to(model.device)).logits.float()
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb["labels"].to(model.device).flatten(),
                                                   reduction="none")
            mask = mb["loss_mask"].to(model.device).flatten().float()
            total += float((ce * mask).sum())
            count += float(mask.sum())
        out.append(total / count)
    return out


def _trainer_batches(args, iterations: int) -> list:
    """The full-sequence micro-batches of the trainer's first ``iterations`` global batches (one process)."""
    from megatron_simreg.parallel.process import init_distributed

    init_distributed()
    from megatron.core import parallel_state as ps

    from megatron_simreg.training.data import Batches, build_datasets

    ps.initialize_model_parallel()
    gbs = args.global_batch_size or args.micro_batch_size
    train_ds, _, _ = build_datasets(args, gbs, args.train_iters * gbs)  # as the trainer does from iteration 0
    batches = Batches(train_ds, gbs, args.micro_batch_size)
    return [batches.full(it) for it in range(iterations)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu_acceptance", help="working directory (runs, exports)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: keeps the script working in CI")
    p.add_argument("--data-cache-path", default=None,
                   help="where the default corpus is prepared (default: OUT/data_cache)")
    args = p.parse_args(argv)
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA device; run on a GPU machine, or pass --cpu-smoke to exercise the script on CPU",
              file=sys.stderr)
        return 2
    return Acceptance(Path(args.out).resolve(), args.cpu_smoke, args.data_cache_path).run()


if __name__ == "__main__":
    sys.exit(main())
