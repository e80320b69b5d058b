"""What a resumed run may change, and what it must not change silently.

A checkpoint's ``meta.json`` records the run's data settings (:func:`data_settings`)
and its flags. On ``--load`` the trainer compares them with this run's:

* **Data and regularizer settings** (global batch, seed, data path and blend,
  split, tokenizer, the document flags, SimReg/JREG weights) each change the losses, so a
  difference is refused with the list of fields, unless
  ``--allow-changed-on-resume`` names it; then it is logged.
* **The LR schedule** follows Megatron-LM: a flag that differs from the
  checkpoint's schedule is refused unless ``--override-opt_param-scheduler``
  (the flags win) or ``--use-checkpoint-opt_param-scheduler`` (the checkpoint
  wins) says which to use.

The model's shape and layout are checked separately (:func:`.checkpoint.check_compatible`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ..data.tokenizer import tokenizer_sha256

# flag name (as --allow-changed-on-resume takes it) -> data_settings() key
RESUMABLE_CHANGES = {
    "global-batch-size": "global_batch_size", "seed": "seed", "data-path": "data_path", "split": "split",
    "tokenizer-model": "tokenizer_sha256", "tokenizer-type": "tokenizer_type", "simreg-weight": "simreg_weight",
    "simreg-temperature": "simreg_temperature", "simreg-scope": "simreg_scope", "jreg-weight": "jreg_weight",
    "mock-data": "mock_data", "eod-mask-loss": "eod_mask_loss", "reset-position-ids": "reset_position_ids",
    "reset-attention-mask": "reset_attention_mask",
}
# what a checkpoint written before a key was recorded means by its absence
OLD_DEFAULTS = {"tokenizer_type": "SentencePieceTokenizer", "simreg_scope": "sequence", "mock_data": False,
                "eod_mask_loss": False, "reset_position_ids": False, "reset_attention_mask": False}
# this run's flag -> the scheduler setting it feeds (training/backends.py _scheduler)
SCHEDULE_FLAGS = ("lr", "min_lr", "lr_warmup_iters", "lr_decay_style", "train_iters", "weight_decay")


def data_settings(args, global_batch_size: int, tokenizer_model: Optional[str],
                  tokenizer_type: Optional[str] = None) -> Dict[str, Any]:
    """The settings that decide which tokens a run trains on and what it optimises (``meta.json["data"]``).

    ``tokenizer_type``: the tokenizer actually used (default: ``args.tokenizer_type``)."""
    tokenizer_type = tokenizer_type or args.tokenizer_type
    return {"global_batch_size": global_batch_size, "seed": args.seed, "data_path": args.data_path,
            "split": args.split, "tokenizer_sha256": tokenizer_sha256(tokenizer_model), "tokenizer_type": tokenizer_type,
            "simreg_weight": args.simreg_weight, "simreg_temperature": args.simreg_temperature,
            "simreg_scope": args.simreg_scope, "jreg_weight": args.jreg_weight, "mock_data": args.mock_data,
            "eod_mask_loss": args.eod_mask_loss, "reset_position_ids": args.reset_position_ids, "reset_attention_mask": args.reset_attention_mask}


def check_data(saved: Optional[Dict[str, Any]], current: Dict[str, Any], allowed: List[str], where: str,
               log=print) -> None:
    """Refuse a data/regularizer change the user did not name in ``--allow-changed-on-resume``; log the others."""
    if saved is None:  # an import-hf checkpoint, or one written before these were recorded
        return
    saved = {**OLD_DEFAULTS, **saved}
    changed = [flag for flag, key in RESUMABLE_CHANGES.items() if saved.get(key) != current.get(key)]
    refused = [flag for flag in changed if flag not in allowed]
    lines = [f"  --{flag}: checkpoint={saved.get(RESUMABLE_CHANGES[flag])!r} "
             f"run={current.get(RESUMABLE_CHANGES[flag])!r}" for flag in changed]
    if refused:
        raise ValueError(
            f"resuming {where} with changed data or regularizer settings:\n" + "\n".join(lines) + "\n"
            "each changes the losses from here on. Use the checkpoint's values, or, if the change is intended, "
            f"pass --allow-changed-on-resume {' '.join(refused)}")
    if changed:
        log(f"resuming {where} with changes allowed by --allow-changed-on-resume:\n" + "\n".join(lines))


def check_schedule(saved_args: Optional[Dict[str, Any]], args, where: str) -> None:
    """Megatron-LM's rule: a schedule flag that differs from the checkpoint's needs one of the two scheduler flags."""
    if saved_args is None or args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler:
        return
    diff = [f"  --{k.replace('_', '-')}: checkpoint={saved_args.get(k)!r} run={getattr(args, k)!r}"
            for k in SCHEDULE_FLAGS if k in saved_args and saved_args[k] != getattr(args, k)]
    if diff:
        raise ValueError(
            f"resuming {where}: the LR schedule flags differ from the checkpoint's:\n" + "\n".join(diff) + "\n"
            "pass --override-opt_param-scheduler to follow this run's flags (the schedule continues from the "
            "checkpoint's iteration; a longer --train-iters stretches the decay), or "
            "--use-checkpoint-opt_param-scheduler to keep the checkpoint's schedule (iterations past its "
            "--train-iters then train at its --min-lr)")
