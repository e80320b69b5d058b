"""A comparison grid: models x methods x seeds, read from YAML and checked before anything runs.

::

    train:          # trainer flags shared by every run (Megatron-LM names; `config: FILE` allowed)
      config: examples/configs/demo_cpu.yaml
    data:           # the same data for every run, and the token budget
      tokens: 400000            # per run; sets --train-iters (or give train-iters)
      # compute-multipliers: [1.25, 1.5]  # extra baselines at 1.25x and 1.5x the budget: see Compute multipliers
      data-path: null           # default: the package's default corpus (stdlib source, built once)
      # tokenizer-model: DIR    # with data-path; tokenizer-type: HuggingFaceTokenizer for a tokenizer.json dir
    models:         # name -> trainer flags (`config: FILE` replaces train's; `tokens`/`train-iters`: its own budget)
      dense: {}
      moe: {num-experts: 4, moe-router-topk: 2}
    methods:        # name -> trainer flags; `baseline` is required and is what the others are measured against
      baseline: {}              # or a sweep, e.g. {lr: [1.0e-3, 3.0e-3]}: see Sweeps below
      simreg: {simreg-weight: 0.1}
      simreg-ablation: {simreg-weight: [0.03, 0.1, 0.3], simreg-temperature: [0.05, 0.1]}  # 6 methods
      jreg: {jreg-weight: 3.0}
      simreg+jreg: {simreg-weight: 0.1, jreg-weight: 3.0}
    seeds: [1, 2, 3]
    evaluation:
      zero-shot: {tasks: [pycode_next_line], limit: null, batch-size: 8}
      analysis: {sequences: 8}  # validation sequences for the representation and layer-jump analysis

Explicit flags (``train:``, ``models:``, ``methods:``, later ones winning) override a config file's
values. Every run of one model and seed gets the same flags except its method's, the same ``--seed`` (hence the
same initial weights, by :mod:`megatron_simreg.megatron.init`) and the same data order, so differences
between methods come from the method. Methods that do not set ``simreg-weight`` / ``jreg-weight`` get 0:
a model config that enables a regularizer cannot leak into the baseline.

Sweeps: in ``methods:`` (the baseline included) a flag whose value is a list of scalars is swept: the method
becomes one method per combination of the listed values (cartesian product, first flag slowest, in the listed
order), named ``<method>_<flag>-<value>[_<flag>-<value>...]`` with a value's ``.`` written ``p`` and a leading
``-`` written ``m``, e.g. ``simreg-ablation_simreg-weight-0p03_simreg-temperature-0p05`` and
``baseline_lr-0p001`` (run ``dense.baseline_lr-0p001.s1``). :attr:`Grid.sweeps` keeps each such method's
original name and values, for the report's sensitivity tables and plots. (A flag that takes several values
goes under ``train:`` or the model.) When the baseline is swept, each method is measured against the *tuned
baseline*, per model: the baseline variant with the lowest mean final validation loss over the seeds that every
variant has finished (the first listed on a tie), paired by seed as usual. The other baseline variants are
measured against it too. Other methods do not take the tuned baseline's flags: sweep them as well where they
should.

Compute multipliers: ``data: {compute-multipliers: [1.25, 1.5]}`` (optional; numbers > 1, no repeats) adds, per
model and seed and multiplier ``m``, a *budget baseline*: the baseline's run with ``--train-iters`` = the model's
iterations x ``m``, rounded up, and every other flag unchanged. Its learning-rate schedule is its own and complete:
the decay spans ``--train-iters`` (the trainer has no separate decay length), and ``--lr-warmup-iters``, an
iteration count (there is no warmup fraction), stays as given. It is named ``baseline_x<m>`` (``baseline_x1p25``;
run ``dense.baseline_x1p25.s1``), listed in :attr:`Grid.budget_baselines`, trained and evaluated with the grid's
runs (:attr:`Grid.runs`), but it is not a method: not in :attr:`Grid.methods`, never the tuned baseline, not
measured by tokens-to-target. The summary uses the budget baselines' final losses for each method's *effective
compute multiplier*. A swept baseline cannot have them (which variant would be trained longer is only known after
the grid has run).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

TOP_KEYS = {"train", "data", "models", "methods", "seeds", "evaluation"}
BUDGET_KEYS = ("tokens", "train-iters")
MULTIPLIER_KEY = "compute-multipliers"
DATA_KEYS = {"tokens", "train-iters", MULTIPLIER_KEY, "data-path", "tokenizer-model", "tokenizer-type", "split",
             "data-cache-path"}
EVAL_KEYS = {"zero-shot", "analysis"}
ZERO_SHOT_KEYS = {"tasks", "limit", "batch-size"}
ANALYSIS_KEYS = {"sequences"}
# Set by compare itself (run directory, seed, budget) or by `data:` (shared by every run).
RESERVED = {"save", "load", "seed", "fresh-start", "exit-interval", "tensorboard-dir", "train-iters", "nproc-per-node",
            "data-path", "tokenizer-model", "tokenizer-type", "split", "data-cache-path"}
REGULARIZER_WEIGHTS = ("simreg-weight", "jreg-weight")
_NAME = re.compile(r"^[A-Za-z0-9_+-]+$")  # run names are "<model>.<method>.s<seed>", so no dots


class GridError(ValueError):
    pass


@dataclass
class Run:
    """One training run of the grid."""

    name: str  # "<model>.<method>.s<seed>": the directory under OUT/runs
    model: str
    method: str
    seed: int
    train_argv: List[str]  # everything but --save/--load, which depend on where it runs
    train_iters: int
    tokens_per_iter: int


@dataclass
class Grid:
    path: str
    models: Dict[str, List[str]]
    methods: Dict[str, List[str]]
    seeds: List[int]
    runs: List[Run]
    zero_shot_tasks: List[str] = field(default_factory=list)
    zero_shot_limit: Optional[int] = None
    zero_shot_batch_size: int = 8
    analysis_sequences: int = 8
    data: Dict[str, object] = field(default_factory=dict)
    # A swept method's name -> {"method": the name in the grid file, "values": {flag: this method's value}}
    sweeps: Dict[str, dict] = field(default_factory=dict)
    # A budget baseline's method name -> its multiplier of the model's budget, e.g. {"baseline_x1p25": 1.25}
    budget_baselines: Dict[str, float] = field(default_factory=dict)

    def run(self, model: str, method: str, seed: int) -> Run:
        return next(r for r in self.runs if (r.model, r.method, r.seed) == (model, method, seed))

    def origin(self, method: str) -> str:
        """The method's name in the grid file (``simreg`` for ``simreg_simreg-weight-0p1``)."""
        return self.sweeps[method]["method"] if method in self.sweeps else method

    @property
    def baselines(self) -> List[str]:
        """The baseline's variants: ``["baseline"]`` unless the baseline is swept."""
        return [m for m in self.methods if self.origin(m) == "baseline"]


def mapping_to_argv(value, where: str) -> List[str]:
    """Trainer flags from a mapping ``{flag-name: value}`` (``true`` -> bare flag, ``false``/``null`` -> omitted)."""
    if value is None:
        return []
    if not isinstance(value, dict):
        raise GridError(f"{where}: expected a mapping of trainer flag names to values, e.g. {{num-layers: 4}}, "
                        f"got {type(value).__name__}")
    out = []
    for k, v in value.items():
        flag = "--" + str(k).lstrip("-")
        if v is True:
            out.append(flag)
        elif v is False or v is None:
            continue
        elif isinstance(v, list):
            out += [flag, *map(str, v)]
        else:
            out += [flag, str(v)]
    return out


def _keys(value: dict) -> set:
    return {str(k).lstrip("-") for k in (value or {})}


def _check_mapping(value, where: str, allowed: Optional[set] = None) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise GridError(f"{where}: expected a mapping, got {type(value).__name__}")
    if allowed is not None:
        unknown = _keys(value) - allowed
        if unknown:
            raise GridError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")
    return {str(k).lstrip("-"): v for k, v in value.items()}


def _check_flags(value, where: str) -> dict:
    value = _check_mapping(value, where)
    clash = set(value) & RESERVED
    if clash:
        raise GridError(f"{where}: {sorted(clash)} are set by compare (seeds: `seeds:`; budget and data: `data:`; "
                        "run directories: --out; processes: compare --nproc-per-node or the SLURM options); "
                        "remove them here")
    return value


def _names(value, where: str) -> dict:
    value = _check_mapping(value, where)
    if not value:
        raise GridError(f"{where}: name at least one (a mapping name -> trainer flags)")
    for name in value:
        if not _NAME.match(name):
            raise GridError(f"{where}: name {name!r} may only use letters, digits, '_', '-' and '+'")
    return value


def parse_train(argv: List[str], where: str):
    """The trainer's own parser and checks on ``argv``; its error becomes a :class:`GridError` naming ``where``."""
    from ..training.args import parse_train_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse_train_args(argv)
    except SystemExit:
        msg = err.getvalue().strip().splitlines()
        raise GridError(f"{where}: the trainer rejects these flags: {msg[-1] if msg else 'invalid flags'}") from None


def load_grid(path: str) -> Grid:
    """Read and check ``path``; every run's flags go through the trainer's parser now, not after an hour of runs."""
    import yaml

    if not os.path.isfile(path):
        raise GridError(f"--grid {path}: no such file")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise GridError(f"--grid {path}: not valid YAML: {e}") from None
    raw = _check_mapping(raw, f"--grid {path}", TOP_KEYS)
    where = f"--grid {path}"
    train = _resolve_config(_check_flags(raw.get("train"), f"{where}: train"), path)
    data = _check_mapping(raw.get("data"), f"{where}: data", DATA_KEYS)
    models = _names(raw.get("models"), f"{where}: models")
    methods = _names(raw.get("methods"), f"{where}: methods")
    if "baseline" not in methods:
        raise GridError(f"{where}: methods: a method named `baseline` is required (the reference for "
                        "tokens-to-target and speed-up), e.g. `baseline: {{}}`")
    budgets = {}
    for k, v in models.items():  # a model may carry its own budget (scales differ); it is not a trainer flag
        v = dict(_check_mapping(v, f"{where}: models: {k}"))
        budgets[k] = {b: v.pop(b) for b in BUDGET_KEYS if b in v} or {b: data[b] for b in BUDGET_KEYS if b in data}
        if len(budgets[k]) != 1:
            raise GridError(f"{where}: models: {k}: give the budget as exactly one of `tokens` (per run) or "
                            "`train-iters`, under data: (every model) or under the model")
        models[k] = _resolve_config(_check_flags(v, f"{where}: models: {k}"), path)
    methods, sweeps = expand_sweeps({k: _check_flags(v, f"{where}: methods: {k}") for k, v in methods.items()},
                                    f"{where}: methods")
    seeds = raw.get("seeds", [1234])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise GridError(f"{where}: seeds: expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise GridError(f"{where}: seeds: {seeds} repeats a seed")

    ev = _check_mapping(raw.get("evaluation"), f"{where}: evaluation", EVAL_KEYS)
    zs = _check_mapping(ev.get("zero-shot"), f"{where}: evaluation: zero-shot", ZERO_SHOT_KEYS)
    an = _check_mapping(ev.get("analysis"), f"{where}: evaluation: analysis", ANALYSIS_KEYS)
    tasks = zs.get("tasks") or []
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise GridError(f"{where}: evaluation: zero-shot: tasks must be a list of lm-eval task names")
    grid = Grid(path=os.path.abspath(path), models={k: mapping_to_argv(v, k) for k, v in models.items()},
                methods={k: mapping_to_argv(v, k) for k, v in methods.items()}, seeds=list(seeds), runs=[],
                zero_shot_tasks=tasks, zero_shot_limit=_positive(zs.get("limit"), f"{where}: zero-shot: limit", True),
                zero_shot_batch_size=_positive(zs.get("batch-size", 8), f"{where}: zero-shot: batch-size"),
                analysis_sequences=_positive(an.get("sequences", 8), f"{where}: analysis: sequences", zero=True),
                data=data, sweeps=sweeps)
    for name in grid.baselines:
        base = methods[name]
        if any(float(base.get(w) or 0) != 0 for w in REGULARIZER_WEIGHTS):
            raise GridError(f"{where}: methods: {name} sets {[w for w in REGULARIZER_WEIGHTS if base.get(w)]}; the "
                            "baseline trains without SimReg and JREG")
    train_argv = mapping_to_argv(train, f"{where}: train")
    grid.budget_baselines = budget_baselines(data.get(MULTIPLIER_KEY), grid, f"{where}: data: {MULTIPLIER_KEY}")
    data_argv = mapping_to_argv({k: v for k, v in data.items() if k not in (*BUDGET_KEYS, MULTIPLIER_KEY)}, "data")
    # Seed-major order: after each seed the grid holds a complete comparison, if it stops there.
    for seed in seeds:
        for model, model_argv in grid.models.items():
            argvs = {}
            for method, method_argv in grid.methods.items():
                weights = [a for w in REGULARIZER_WEIGHTS if w not in methods[method] for a in ("--" + w, "0")]
                argvs[method] = train_argv + data_argv + model_argv + method_argv + weights + ["--seed", str(seed)]
                grid.runs.append(_make_run(model, method, seed, argvs[method], budgets[model], where))
            for name, m in grid.budget_baselines.items():  # the baseline's flags, a longer run
                iters = _scaled_iters(grid.run(model, "baseline", seed).train_iters, m)
                grid.runs.append(_make_run(model, name, seed, argvs["baseline"], {"train-iters": iters}, where))
    return grid


def budget_baselines(value, grid: Grid, where: str) -> Dict[str, float]:
    """:attr:`Grid.budget_baselines` from ``data: compute-multipliers`` (``None``: none)."""
    if value is None:
        return {}
    if not isinstance(value, list) or not value:
        raise GridError(f"{where}: expected a non-empty list of numbers > 1, e.g. [1.25, 1.5], got {value!r}")
    bad = [m for m in value if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m)
           or m <= 1]
    if bad:
        raise GridError(f"{where}: {bad[0]!r} is not a number > 1 (a multiple of the baseline's budget)")
    if len(set(value)) != len(value):
        raise GridError(f"{where}: {value} repeats a multiplier")
    if grid.baselines != ["baseline"]:
        raise GridError(f"{where}: the baseline is swept; budget baselines need one baseline (which variant to train "
                        "longer is only known after the grid has run): fix its flags, or drop the multipliers")
    names = {f"baseline_x{_name_token(m, where)}": float(m) for m in sorted(value)}
    clash = sorted(set(names) & set(grid.methods))
    if clash:
        raise GridError(f"{where}: a method is named {clash[0]!r}, the name of a budget baseline; rename it")
    return names


def _scaled_iters(iters: int, multiplier: float) -> int:
    """``ceil(iters x multiplier)``, rounded first so that float error (``100 * 1.1 = 110.00000000000001``) does
    not add an iteration."""
    return math.ceil(round(iters * multiplier, 9))


def expand_sweeps(methods: Dict[str, dict], where: str) -> Tuple[Dict[str, dict], Dict[str, dict]]:
    """``methods`` with each swept method replaced, in place, by its variants; and :attr:`Grid.sweeps`."""
    out: Dict[str, dict] = {}
    sweeps: Dict[str, dict] = {}
    for method, flags in methods.items():
        swept = {k: _sweep_values(v, f"{where}: {method}: {k}") for k, v in flags.items() if isinstance(v, list)}
        if not swept:
            out[method] = flags
            continue
        for combo in itertools.product(*swept.values()):
            values = dict(zip(swept, combo))
            name = "_".join([method] + [f"{k}-{_name_token(v, f'{where}: {method}: {k}')}" for k, v in values.items()])
            if name in out or name in methods:
                raise GridError(f"{where}: {method}: the sweep's method {name!r} is named twice (a repeated value, "
                                "or another method of that name)")
            out[name] = {**flags, **values}
            sweeps[name] = {"method": method, "values": values}
    return out, sweeps


def _sweep_values(values: list, where: str) -> list:
    if not values:
        raise GridError(f"{where}: an empty sweep; list at least one value")
    bad = [v for v in values if isinstance(v, (list, dict))]
    if bad:
        raise GridError(f"{where}: a sweep lists scalar values (numbers, strings, true/false), got {bad[0]!r}; a flag "
                        "that takes several values goes under train: or the model")
    return values


def _name_token(value, where: str) -> str:
    """A swept value as part of a method name: ``0.03`` -> ``0p03``, ``-1`` -> ``m1``, ``true`` -> ``true``."""
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    token = re.sub(r"^-", "m", text.replace(".", "p"))
    if not _NAME.match(token):
        raise GridError(f"{where}: the value {value!r} cannot be part of a run name (letters, digits, '.', '_', '-' "
                        "and '+' only)")
    return token


def _make_run(model: str, method: str, seed: int, argv: List[str], budget: dict, where: str) -> Run:
    name = f"{model}.{method}.s{seed}"
    where = f"{where}: run {name}"
    save = ["--save", f"OUT/runs/{name}/checkpoints"]  # a stand-in, so rules like "--save-interval needs --save" hold
    # A token budget needs the batch shape first: parse once with a stand-in iteration count.
    args = parse_train(argv + save + ["--train-iters", str(budget.get("train-iters", 10 ** 9))], where)
    if not args.eval_interval:
        raise GridError(f"{where}: no eval-interval, so no validation curve to compare; set `eval-interval` under "
                        "train:")
    if not args.global_batch_size:
        # Otherwise the batch, hence the tokens per iteration, would change with the number of processes.
        raise GridError(f"{where}: set `global-batch-size` under train: (or the model), so every run sees the "
                        "same tokens per iteration wherever it runs")
    split = [float(x) for x in re.split(r"[,/]", args.split)]
    if len(split) < 2 or split[1] <= 0:
        raise GridError(f"{where}: split {args.split!r} leaves no validation documents; use e.g. 969,30,1")
    tokens_per_iter = args.global_batch_size * args.seq_length
    iters = (int(budget["train-iters"]) if "train-iters" in budget
             else math.ceil(int(budget["tokens"]) / tokens_per_iter))
    if iters < 1:
        raise GridError(f"{where}: the budget gives {iters} iterations; raise it")
    argv = argv + ["--train-iters", str(iters)]
    parse_train(argv + save, where)  # the rules that involve the iteration count
    return Run(name=name, model=model, method=method, seed=seed, train_argv=argv, train_iters=iters,
               tokens_per_iter=tokens_per_iter)


def _resolve_config(flags: dict, grid_path: str) -> dict:
    """A ``config`` path that does not exist as given is taken relative to the grid file, like an include."""
    cfg = flags.get("config")
    if cfg and not os.path.isabs(str(cfg)) and not os.path.isfile(str(cfg)):
        flags["config"] = os.path.join(os.path.dirname(os.path.abspath(grid_path)), str(cfg))
    return flags


def _positive(value, where: str, none_ok: bool = False, zero: bool = False):
    if value is None and none_ok:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if zero else 1):
        raise GridError(f"{where}: expected an integer >= {0 if zero else 1}" + (" or null" if none_ok else "")
                        + f", got {value!r}")
    return value
