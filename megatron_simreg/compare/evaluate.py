"""After a run has trained: its validation curve, HF export, zero-shot accuracy and hidden-state analysis.

Results go to ``OUT/runs/<name>/eval.json``, keyed by the checkpoint iteration and the evaluation
settings, so a rerun of ``compare`` reuses them and a changed setting recomputes them.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch

from ..analysis.convergence import evaluations, read_metrics
from .grid import Grid, Run, parse_train
from .runner import checkpoint_dir, run_dir, state


def _settings(grid: Grid) -> dict:
    return {"zero_shot_tasks": grid.zero_shot_tasks, "zero_shot_limit": grid.zero_shot_limit,
            "analysis_sequences": grid.analysis_sequences}


def validation_tokens(run: Run, n: int) -> torch.Tensor:
    """``[n, s]`` token ids: the first ``n`` samples of the validation split the trainer evaluates on."""
    from ..data.datasets import build_gpt_datasets
    from ..data.tokenizer import build_tokenizer
    from ..training.data import resolve_data

    args = parse_train(run.train_argv, f"run {run.name}")
    data_path, tok_type, tok_model, cache = resolve_data(args)
    _, valid, _ = build_gpt_datasets(data_path, args.split, args.seq_length, args.seed,
                                     build_tokenizer(tok_type, tok_model),
                                     (1, n, None), cache, is_built_on_rank=lambda: True)
    if valid is None or len(valid) < n:
        raise ValueError(f"run {run.name}: the validation split has fewer than {n} sequences of {args.seq_length} "
                         "tokens; lower evaluation: analysis: sequences or give the split more validation documents")
    return torch.stack([torch.as_tensor(valid[i]["tokens"]) for i in range(n)]).long()


def data_contamination(grid: Grid) -> Optional[dict]:
    """The grid's held-out splits' n-gram overlap with its training split (every run shares the data), or
    ``None`` for an empty grid."""
    from ..data.contamination import contamination
    from ..data.datasets import parse_blend
    from ..training.data import resolve_data

    if not grid.runs:
        return None
    args = parse_train(grid.runs[0].train_argv, f"run {grid.runs[0].name}")
    data_path = resolve_data(args)[0]
    return contamination(parse_blend(data_path)[0], args.split)


def evaluate_run(grid: Grid, out: str, run: Run, device: str = "cpu", log=print) -> Optional[Dict]:
    """``eval.json``'s content for a finished run (computed once); ``None`` while the run is unfinished."""
    st, iteration = state(out, run)
    if st != "finished":
        return None
    path = os.path.join(run_dir(out, run), "eval.json")
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("iteration") == iteration and cached.get("settings") == _settings(grid):
            return cached
    points = evaluations(read_metrics(os.path.join(checkpoint_dir(out, run), "metrics.jsonl")))
    result = {"iteration": iteration, "settings": _settings(grid), "tokens": [p["consumed_tokens"] for p in points],
              "val_loss": [p["val_loss"] for p in points]}
    if all(p.get("val_loss_se") is not None for p in points):
        result["val_loss_se"] = [p["val_loss_se"] for p in points]
    if points and points[-1].get("val_batches"):
        result["final_val_batches"] = points[-1]["val_batches"]
    if grid.zero_shot_tasks or grid.analysis_sequences:
        hf_dir = os.path.join(run_dir(out, run), "hf")
        from ..conversion.export import export_hf

        log(f"{run.name}: exporting to {hf_dir}")
        export_hf(checkpoint_dir(out, run), hf_dir, iteration=iteration, log=lambda *_: None)
        if grid.zero_shot_tasks:
            from ..analysis.zero_shot import evaluate_zero_shot

            log(f"{run.name}: zero-shot {', '.join(grid.zero_shot_tasks)}")
            result["zero_shot"] = evaluate_zero_shot(hf_dir, grid.zero_shot_tasks, limit=grid.zero_shot_limit,
                                                     batch_size=grid.zero_shot_batch_size, device=device,
                                                     work_dir=run_dir(out, run))
        if grid.analysis_sequences:
            from ..analysis.hf_probe import analyze, load_causal_lm

            log(f"{run.name}: representation and layer analysis on {grid.analysis_sequences} validation sequences")
            model, _ = load_causal_lm(hf_dir, device=device)
            result["analysis"] = analyze(model, validation_tokens(run, grid.analysis_sequences).to(device))
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    return result
