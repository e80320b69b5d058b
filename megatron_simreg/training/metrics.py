"""Where training metrics go: ``<save>/metrics.jsonl``, TensorBoard, Weights & Biases, and the terminal.

Only global rank 0 writes. Each logged iteration is one JSON object per line,
appended and flushed at once so a crash loses at most the current line. A
resumed run first drops the rows after its checkpoint's iteration, which it
logs again, so each iteration appears once.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, Optional

import torch


class MetricsWriter:
    def __init__(self, save_dir: Optional[str], tensorboard_dir: Optional[str], total_iters: int, start_iter: int,
                 enabled: bool = True, wandb: Optional[Dict[str, Any]] = None):
        """``wandb``: ``wandb.init``'s keyword arguments (project, name, dir, config), or None for no wandb."""
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.bar = None
        self.wandb = None
        if not enabled:
            return
        if wandb is not None:
            import wandb as wandb_module

            if wandb.get("dir"):
                os.makedirs(wandb["dir"], exist_ok=True)
            self.wandb = wandb_module.init(**wandb)
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
            path = os.path.join(save_dir, "metrics.jsonl")
            _drop_rows_after(path, start_iter)
            self.jsonl = open(path, "a")
        tb_dir = tensorboard_dir or (os.path.join(save_dir, "tensorboard") if save_dir else None)
        if tb_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(tb_dir)
            except ImportError:  # tensorboard is optional; say so once
                print("note: tensorboard is not installed; TensorBoard logs are off (pip install tensorboard)")
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_iters, initial=start_iter, unit="it", dynamic_ncols=True)

    def log(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        it = record["iteration"]
        scalars = {k: v for k, v in record.items() if k != "iteration" and isinstance(v, (int, float))}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, it)
        if self.wandb:
            self.wandb.log(scalars, step=it)
        shown = {k: record[k] for k in ("lm_loss", "val_loss", "simreg_loss", "jreg_loss", "lr", "grad_norm")
                 if record.get(k) is not None}
        text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
        if record.get("val_loss_se") is not None:
            text = text.replace(f"val_loss={record['val_loss']:.4g}",
                                f"val_loss={record['val_loss']:.4g}±{record['val_loss_se']:.2g}")
        if self.bar:
            self.bar.n = it
            self.bar.set_postfix_str(text, refresh=True)
        else:
            print(f"iteration {it}: {text}", flush=True)

    def close(self) -> None:
        for h in (self.jsonl, self.tb, self.bar):
            if h is not None:
                h.close()
        if self.wandb is not None:
            self.wandb.finish()


def _drop_rows_after(path: str, iteration: int) -> None:
    """Keep only the rows up to ``iteration``: a run resumed from it logs the later ones again (atomic rewrite)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["iteration"] <= iteration:
                keep.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by a crash
            continue
    if len(keep) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


def tflops(n_params: float, args, tokens: int, seconds: float) -> float:
    """Model TFLOP/s of ``tokens`` in ``seconds``, all ranks together."""
    # 6 N per token for the dense matmuls (fwd + bwd), plus attention scores
    attention = 12 * args.num_layers * args.hidden_size * args.seq_length
    return (6 * n_params + attention) * tokens / seconds / 1e12


def mem_gb() -> float:
    """Peak memory of this process: CUDA allocations on GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def moe_aux_loss(num_micro: int) -> float:
    """The step's MoE load-balancing loss, from megatron-core's tracker (reduced across ranks, then cleared)."""
    from megatron.core.transformer.moe import moe_utils

    moe_utils.reduce_aux_losses_tracker_across_ranks()
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    total = sum(float(v["values"].sum()) for v in tracker.values() if "values" in v) / max(num_micro, 1)
    moe_utils.clear_aux_losses_tracker()
    return total
