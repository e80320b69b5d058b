"""The GPU path users take, checked end to end on one GPU: prints PASS or FAIL per check.

Run it through ``bash tools/gpu_acceptance.sh`` (sets up .venv first). Meant
for one H100/H200 in under 10 minutes (unverified on GPU: it has not run on
one yet); TransformerEngine's layer spec is used when it is importable (the
trainer picks it). Every check can fail: ``tests/test_gpu_acceptance.py``
plants one bug of each check's kind and asserts its FAIL. Checks:

1. train: bf16 + distributed optimizer (+ TE spec) with SimReg and JREG; every
   logged loss and gradient norm is finite, and the validation loss falls: it
   is measured after every iteration on the same held-out batches, so its fall
   is the weights', not a batch's (the training loss of 8 CPU iterations falls
   less than it varies from batch to batch). Iteration 1's step has a rate of 0
   (the warmup starts at 0), so its validation loss is the initial model's.
2. resume: a second run is SIGKILLed after a checkpoint and resumed (hidden
   dropout is on, so the RNG states must be restored too). Two fresh
   processes (the uninterrupted run and the killed one before its kill) must
   log bitwise-equal metrics (``DETERMINISTIC_ENV``); the resumed run must then
   log the uninterrupted run's lm/simreg/jreg losses and gradient norms,
   bitwise, at every iteration after the checkpoint. Where two fresh processes
   differ (non-deterministic kernels), the first resumed iteration's forward
   losses must still equal the killed run's bitwise (a forward on the same
   weights and batch), and the later ones may differ from the killed run by at
   most what the two fresh runs differed by after as many iterations.
3. no-load-optim: run 1 exported to HF with ``--verify`` (the exported model's
   logits against the checkpoint's, max |dlogit| 1e-4), imported back, trained
   with ``--load --no-load-optim --lr 0`` for 2 iterations: both logged losses
   equal the HF model's loss on the same batches (iteration 2 catches fp32 main
   parameters that were not reloaded from the checkpoint).
4. recompute: ``--recompute-granularity full`` with JREG logs the run-1 losses
   and gradient norms at every iteration, bitwise (recompute re-runs the same
   kernels on the same inputs, with the same dropout masks); a refusal is a FAIL. Where check 2 found two
   fresh processes to differ, iteration 1's forward losses must still be
   bitwise equal and the rest within that measured process-to-process spread.
5. norms: every norm module of a freshly initialized model, selected by type
   (torch/Megatron/TransformerEngine norm classes, TE's fused LayerNormLinear
   and LayerNormMLP included), has a gain of exactly 1 (and a bias of 0); there
   are 2L+1 of them for a dense model with a final norm (4L+1 with
   ``--qk-layernorm``), and no parameter named like a norm is outside them.

``--cpu-smoke`` runs the same checks on a tiny model on CPU (gloo), which is
how CI keeps this script working; it proves nothing about GPUs. ``--only N``
runs check N (repeatable); checks 2-4 need run 1, which is trained first
unless ``--reference DIR`` names one (run 1's directory, ``OUT/train``, from an
earlier run with the same flags).
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
          "--lr-warmup-iters", "2", "--log-interval", "1", "--simreg-weight", "0.1", "--jreg-weight", "1.0",
          # an RNG consumer, so that a resume must restore the RNG states and a recompute must replay them
          "--hidden-dropout", "0.1"]
EVAL_ITERS = 2
EVALUATE = ["--eval-interval", "1", "--eval-iters", str(EVAL_ITERS)]  # check 1's validation loss, every iteration
# What two processes need to run the same kernels in the same order (Megatron-LM's reproducibility recipe, less
# --deterministic-mode, which the trainer does not have): TransformerEngine's deterministic attention backends,
# cuBLAS's fixed workspace, NCCL's ring (no collective runs on one GPU). CPU kernels are deterministic for a fixed
# thread count. Checks 2 and 4 measure whether this holds (two fresh runs compared) instead of assuming it.
DETERMINISTIC_ENV = {"NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
                     "NCCL_ALGO": "Ring"}
ENV = {**DETERMINISTIC_ENV, "PYTHONUNBUFFERED": "1"}
FORWARD = ("lm_loss", "simreg_loss", "jreg_loss")  # values of the forward pass
LOGGED = (*FORWARD, "grad_norm", "val_loss")  # ... and of the backward and the update
RUN1_RECORD = "acceptance_run1.json"  # run 1's settings, beside its metrics.jsonl (see --reference)
CHECKS = {1: "train", 2: "resume", 3: "no_load_optim", 4: "recompute", 5: "norms"}


class Acceptance:
    def __init__(self, out: Path, cpu_smoke: bool, data_cache: "str | None" = None, only=None,
                 reference: "Path | None" = None):
        self.out, self.cpu_smoke = out, cpu_smoke
        self.model = CPU_MODEL if cpu_smoke else GPU_MODEL
        self.iters = 8 if cpu_smoke else 40
        self.save_interval = 4 if cpu_smoke else 10
        self.timeout = 300 if cpu_smoke else 900  # seconds, for each command the checks start
        self.results = []
        self.cache = data_cache or str(out / "data_cache")
        self.only = set(only or CHECKS)
        self.reference = reference  # run 1's directory when it is not trained here
        self.spread = None  # per iteration: the largest relative difference of two fresh runs (check 2)

    # ------------------------------------------------------------------ helpers
    def cli(self, *argv, check=True, timeout=None):
        out = _run([sys.executable, "-m", "megatron_simreg.cli", *argv], timeout or self.timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:1])} exited {out.returncode}:\n{out.stdout[-3000:]}\n"
                               f"{out.stderr[-3000:]}")
        return out

    def train_flags(self, *extra):
        return ["train", *self.model, *COMMON, *EVALUATE, "--train-iters", str(self.iters), "--data-cache-path",
                self.cache, *extra]

    @property
    def run1(self) -> Path:
        return self.reference or self.out / "train"

    @staticmethod
    def metrics(save, killed: bool = False) -> dict:
        """iteration -> its record in ``metrics.jsonl`` (a resumed run keeps each iteration once); ``killed``: the
        last line may be cut short (the writer was SIGKILLed), and is then left out."""
        with open(Path(save) / "metrics.jsonl") as f:
            lines = [line for line in f if line.strip()]
        if killed and lines:
            try:
                json.loads(lines[-1])
            except ValueError:
                lines.pop()
        rows = [json.loads(line) for line in lines]
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
    def train_run1(self):
        save = self.out / "train"
        self.cli(*self.train_flags("--save", str(save), "--save-interval", str(self.save_interval)))
        (save / RUN1_RECORD).write_text(json.dumps(self.run1_settings()))
        return save

    def run1_settings(self) -> dict:
        """What run 1's records depend on: its flags (less where it writes) and the deterministic settings."""
        return {"flags": self.train_flags("--save-interval", str(self.save_interval)), "env": DETERMINISTIC_ENV}

    def check_reference(self) -> None:
        """Refuse a ``--reference`` that is not run 1 of this script with these flags (its records would differ)."""
        try:
            saved = json.loads((self.reference / RUN1_RECORD).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --reference {self.reference}: not run 1 of this script ({e})") from None
        want = self.run1_settings()
        strip = ("--data-cache-path",)  # where the corpus is cached does not change it
        if _without(saved["flags"], strip) != _without(want["flags"], strip) or saved["env"] != want["env"]:
            raise SystemExit(f"error: --reference {self.reference} was trained with other flags or settings "
                             f"({saved}); this run's: {want}")

    def train(self):
        save = self.train_run1()
        rows = self.metrics(save)
        missing = sorted(set(range(1, self.iters + 1)) - set(rows))
        if missing:
            return False, f"iterations {missing} were not logged"
        first, last = rows[1], rows[self.iters]
        bad = [(i, k, r.get(k)) for i, r in sorted(rows.items()) for k in LOGGED
               if not isinstance(r.get(k), (int, float)) or not math.isfinite(r[k])]
        ok = not bad and last["val_loss"] < first["val_loss"]
        return ok, (f"validation loss (the same {EVAL_ITERS} held-out batches) {first['val_loss']:.6f} -> "
                    f"{last['val_loss']:.6f}; training lm_loss {first['lm_loss']:.4f} -> {last['lm_loss']:.4f}; "
                    f"not finite: {bad[:4] or 'none'}; simreg {last['simreg_loss']:.4f}, jreg "
                    f"{last['jreg_loss']:.4g}, {last.get('tokens_per_sec', 0):.0f} tokens/s, te={_te_available()}")

    def resume(self):
        ref = self.metrics(self.run1)
        save = self.out / "killed"
        log_path = self.out / "killed.log"
        flags = self.train_flags("--save", str(save), "--save-interval", str(self.save_interval))
        kill_after = self.save_interval + 1  # a checkpoint exists, and the run is past it
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "megatron_simreg.cli", *flags], cwd=ROOT,
                                    env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            killed, deadline = False, time.monotonic() + self.timeout
            try:
                while proc.poll() is None:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the run to be killed logged no iteration > {kill_after} within "
                                           f"{self.timeout} s (log: {log_path})")
                    if _last_logged(save / "metrics.jsonl") > kill_after:
                        os.killpg(proc.pid, signal.SIGKILL)
                        killed = True
                        break
                    time.sleep(0.01)
            finally:
                _stop(proc)
        if not killed:
            return False, f"inconclusive: the run exited {proc.returncode} before it could be killed ({log_path})"
        before = self.metrics(save, killed=True)  # the killed run: iterations 1..k of a fresh process
        k = max(before)
        self.cli(*flags, "--load", str(save))
        got = self.metrics(save)
        resumed = range(self.save_interval + 1, self.iters + 1)
        if sorted(got) != list(range(1, self.iters + 1)):
            return False, f"the resumed run logged iterations {sorted(got)}"
        # premise: two fresh processes (run 1 and the killed run before its kill) agree bitwise
        self.spread = _spread(before, ref, range(1, k + 1))
        if not all(map(math.isfinite, self.spread.values())):
            worst = _worst(before, ref, range(1, k + 1))
            self.spread = None
            return False, f"two fresh runs log different or missing values: {_describe(worst)}"
        first = self.save_interval + 1
        fwd = [key for key in FORWARD if got[first][key] != before[first][key]]
        if fwd:  # a forward on the checkpoint's weights and the batch after it: deterministic on any machine
            return False, (f"iteration {first} (the first after the checkpoint) logs {_show(got[first], fwd)}, the "
                           f"killed run {_show(before[first], fwd)}: weights, RNG states or data position not restored")
        if not any(self.spread.values()):
            worst = _worst(got, ref, resumed)
            return worst[0] == 0, (f"killed after iteration {k}, resumed from {self.save_interval}; two fresh runs "
                                   f"agree bitwise over iterations 1-{k}; resumed vs uninterrupted (tolerance 0): "
                                   f"{_describe(worst)}")
        # non-deterministic kernels: compare with the killed run, which shares the checkpoint's state
        allowed = max(self.spread.values())
        worst = _worst(got, before, range(first, k + 1))
        return worst[0] <= allowed, (f"two fresh runs differ (relative {allowed:.2e} over iterations 1-{k}: "
                                     f"non-deterministic kernels); iteration {first}'s forward losses bitwise equal; "
                                     f"resumed vs killed over {first}-{k}: {_describe(worst)} (tolerance "
                                     f"{allowed:.2e}); vs uninterrupted: {_describe(_worst(got, ref, resumed))}")

    def no_load_optim(self):
        hf, ck, cont = self.out / "hf", self.out / "imported", self.out / "continued"
        self.cli("export-hf", "--load", str(self.run1), "--out", str(hf), "--verify")
        self.cli("import-hf", "--hf", str(hf), "--save", str(ck), "--seq-length", self.model[self.model.index(
            "--seq-length") + 1])
        flags = self.train_flags("--load", str(ck), "--no-load-optim", "--save", str(cont))
        flags = _set(flags, "--train-iters", "2")
        flags = _set(_set(_set(flags, "--lr", "0"), "--min-lr", "0"), "--lr-warmup-iters", "0")
        flags = _set(flags, "--hidden-dropout", "0")  # the training loss is compared with an HF forward in eval mode
        self.cli(*flags)
        got = self.metrics(cont)
        want = _in_subprocess("_hf_losses", [str(hf), *flags[1:]], self.timeout)
        rel = [abs(got[i + 1]["lm_loss"] - want[i]) / want[i] for i in range(2)]
        tol = 2e-2  # bf16 Megatron vs fp32 transformers
        return max(rel) <= tol, (f"export verified (max |dlogit| <= 1e-4); train {got[1]['lm_loss']:.4f}, "
                                 f"{got[2]['lm_loss']:.4f} vs HF {want[0]:.4f}, {want[1]:.4f} (relative "
                                 f"{max(rel):.2e}, tolerance {tol})")

    def recompute(self):
        save = self.out / "recompute"
        self.cli(*self.train_flags("--save", str(save), "--recompute-granularity", "full", "--recompute-method",
                                   "uniform", "--recompute-num-layers", "1"))
        ref, got = self.metrics(self.run1), self.metrics(save)
        its = range(1, self.iters + 1)
        if sorted(got) != list(its):
            return False, f"the recompute run logged iterations {sorted(got)}"
        fwd = [key for key in FORWARD if got[1][key] != ref[1][key]]
        if fwd:  # the same forward kernels on the same weights and batch, with autograd or without
            return False, f"iteration 1 logs {_show(got[1], fwd)}, without recompute {_show(ref[1], fwd)}"
        if not self.spread or not any(self.spread.values()):
            worst = _worst(got, ref, its)
            why = ("two fresh runs agreed bitwise in check 2" if self.spread else
                   "check 2 did not measure the process-to-process spread; assuming deterministic kernels")
            return worst[0] == 0, (f"recompute vs none over {len(its)} iterations (tolerance 0: the same kernels "
                                   f"on the same inputs; {why}): {_describe(worst)}")
        k = max(self.spread)
        allowed = max(self.spread.values())
        worst = _worst(got, ref, range(1, k + 1))
        return worst[0] <= allowed, (f"iteration 1's forward losses bitwise equal; recompute vs none over 1-{k}: "
                                     f"{_describe(worst)} (tolerance {allowed:.2e}: two fresh runs' spread, "
                                     f"check 2)")

    def norms(self):
        found = _in_subprocess("_norms", self.train_flags()[1:], self.timeout)
        norms, want = found["norms"], found["expected"]
        bad = [n["name"] for n in norms if not (n["gain_is_one"] and n["bias_is_zero"])]
        fused = sum(n["fused"] for n in norms)
        ok = len(norms) == want and not bad and not found["unclaimed"]
        return ok, (f"{len(norms)} norm modules (expected {want}: {found['formula']}; {fused} TE fused), types "
                    f"{sorted({n['type'] for n in norms})}; gain not 1 or bias not 0: {bad or 'none'}; "
                    f"norm-named parameters outside them: {found['unclaimed'] or 'none'}")

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.reference is not None:
            self.check_reference()
        if 1 in self.only:
            self.check("train: bf16 + distributed optimizer" + (" + TE" if _te_available() else "")
                       + " with SimReg+JREG", self.train)
        elif self.only & {2, 3, 4} and self.reference is None:
            t0 = time.time()
            self.train_run1()
            print(f"(run 1 trained for checks {sorted(self.only & {2, 3, 4})} in {time.time() - t0:.0f} s)",
                  flush=True)
        if 2 in self.only:
            self.check("resume after SIGKILL continues the uninterrupted run", self.resume)
        if 3 in self.only:
            self.check("--no-load-optim from an exported and imported HF model keeps its weights",
                       self.no_load_optim)
        if 4 in self.only:
            self.check("full recompute with JREG logs the run without recompute", self.recompute)
        if 5 in self.only:
            self.check("norm modules (by type) number 2L+1 and their gains start at 1", self.norms)
        failed = [n for n, v in self.results if v == "FAIL"]
        print(f"\n{len(self.results) - len(failed)}/{len(self.results)} checks passed"
              + (" (CPU smoke run: says nothing about GPUs)" if self.cpu_smoke else ""))
        return 1 if failed else 0


def _run(cmd, timeout) -> subprocess.CompletedProcess:
    """``cmd`` in its own process group with ``ENV``, output captured; the group is killed after ``timeout`` s."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise TimeoutError(f"{' '.join(map(str, cmd[2:4]))} ran past {timeout} s and was killed") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _stop(proc) -> None:
    """Kill ``proc``'s process group (its own session) if it still runs, and reap it (bounded)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # unkillable (e.g. in uninterruptible I/O): give up waiting on it
        pass


def _last_logged(path: Path) -> int:
    """The last iteration in a ``metrics.jsonl`` being written (0 if none); a partly written line is skipped."""
    last = 0
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in lines:
        try:
            last = max(last, int(json.loads(line)["iteration"]))
        except (ValueError, KeyError, TypeError):
            continue
    return last


def _without(flags, names) -> list:
    """``flags`` less each of ``names`` and its value."""
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
        elif f in names:
            skip = True
        else:
            out.append(f)
    return out


def _rel(a, b) -> float:
    if a == b:  # bitwise for floats (and both None)
        return 0.0
    numbers = all(isinstance(x, (int, float)) and math.isfinite(x) for x in (a, b))
    if not numbers:  # a missing or non-finite value on one side only
        return math.inf
    return abs(a - b) / max(abs(b), 1e-12)


def _spread(a: dict, b: dict, iterations) -> dict:
    """iteration -> the largest relative difference over ``LOGGED`` between runs ``a`` and ``b``."""
    return {i: max(_rel(a[i].get(k), b[i].get(k)) for k in LOGGED) for i in iterations}


def _worst(got: dict, want: dict, iterations):
    """``(relative difference, iteration, key, got, want)`` of the largest difference over ``LOGGED``."""
    cells = [(_rel(got[i].get(k), want[i].get(k)), i, k, got[i].get(k), want[i].get(k))
             for i in iterations for k in LOGGED]
    return max(cells, key=lambda c: c[0])


def _describe(worst) -> str:
    rel, i, k, a, b = worst
    if rel == 0:
        return "bitwise equal"
    return f"max relative difference {rel:.2e} ({k} at iteration {i}: {a!r} vs {b!r})"


def _show(row: dict, keys) -> str:
    return ", ".join(f"{k}={row.get(k)!r}" for k in keys)


def _in_subprocess(name, argv, timeout):
    """``name(argv)`` of this module run in a fresh process (it starts torch.distributed), its JSON result."""
    code = f"import sys, json; from tools.gpu_acceptance import {name}; print(json.dumps({name}(sys.argv[1:])))"
    out = _run([sys.executable, "-c", code, *argv], timeout)
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


def norm_classes() -> dict:
    """{norm module class: (gain parameter name, bias parameter name)} for every norm class importable here.

    Megatron's ``WrappedTorchNorm`` and our ``CPUTorchNorm`` return ``torch.nn.LayerNorm``/``RMSNorm`` instances,
    ``TENorm`` returns TE's ``LayerNorm``/``RMSNorm``; TE's ``LayerNormLinear`` (Megatron's
    ``TELayerNormColumnParallelLinear``) and ``LayerNormMLP`` hold a fused norm as ``layer_norm_weight``."""
    import torch

    classes = {torch.nn.LayerNorm: ("weight", "bias")}
    if hasattr(torch.nn, "RMSNorm"):
        classes[torch.nn.RMSNorm] = ("weight", "bias")
    try:
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

        classes[FusedLayerNorm] = ("weight", "bias")
    except ImportError:
        pass
    try:
        import transformer_engine.pytorch as te

        for cls in ("LayerNorm", "RMSNorm"):
            if hasattr(te, cls):
                classes[getattr(te, cls)] = ("weight", "bias")
        for cls in ("LayerNormLinear", "LayerNormMLP"):
            if hasattr(te, cls):
                classes[getattr(te, cls)] = ("layer_norm_weight", "layer_norm_bias")
    except ImportError:
        pass
    return classes


def _norms(train_argv) -> dict:
    """The norm modules of a freshly built and initialized model, selected by type: for each its name, type and
    whether its gain is all ones (and its bias, if any, all zeros); the count a correct model has; and the
    parameters named like a norm's that no selected module holds."""
    import torch

    from megatron_simreg.training.args import parse_train_args

    args = parse_train_args(train_argv)
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
    classes = norm_classes()
    norms, claimed = [], set()
    for name, module in model.named_modules():
        cls = next((c for c in type(module).__mro__ if c in classes), None)
        if cls is None:
            continue
        gain_name, bias_name = classes[cls]
        gain, bias = getattr(module, gain_name, None), getattr(module, bias_name, None)
        prefix = f"{name}." if name else ""
        claimed.update(prefix + n for n, _ in module.named_parameters())
        norms.append({"name": prefix + gain_name, "type": type(module).__name__, "fused": gain_name != "weight",
                      "gain_is_one": gain is not None and bool((gain.detach() == 1).all()),
                      "bias_is_zero": not isinstance(bias, torch.Tensor) or bool((bias.detach() == 0).all())})
    unclaimed = [n for n, _ in model.named_parameters() if "norm" in n.lower() and n not in claimed]
    layers = args.num_layers  # one process: every layer, and the final norm
    per_layer = 2 + (2 if args.qk_layernorm else 0)
    formula = f"{per_layer}L+1 with L={layers}" + (" (--qk-layernorm)" if args.qk_layernorm else "")
    return {"norms": norms, "expected": per_layer * layers + 1, "formula": formula, "unclaimed": unclaimed}

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
    p.add_argument("--only", type=int, action="append", choices=sorted(CHECKS), metavar="N",
                   help="run check N only (repeatable): " + ", ".join(f"{n} {c}" for n, c in CHECKS.items()))
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="run 1's directory (OUT/train of an earlier run with the same flags): checks 2-4 compare "
                        "with it instead of training it again")
    args = p.parse_args(argv)
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA device; run on a GPU machine, or pass --cpu-smoke to exercise the script on CPU",
              file=sys.stderr)
        return 2
    if args.reference and args.only and 1 in args.only:
        p.error("--reference replaces check 1's run: leave out --only 1")
    reference = Path(args.reference).resolve() if args.reference else None
    return Acceptance(Path(args.out).resolve(), args.cpu_smoke, args.data_cache_path, args.only, reference).run()


if __name__ == "__main__":
    sys.exit(main())
