"""Reading our checkpoints (both backends) into one full state dict, and building a single-process
Megatron model for parity checks and for reading/writing Megatron-backend checkpoints."""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from ..training import checkpoint as ckpt
from .layout import ConversionError, megatron_name_map, merge_tp, normalize_megatron_names


def _deepspeed_model(directory: str, model: dict) -> Dict[str, torch.Tensor]:
    """DeepSpeed's ``mp_rank_XX_model_states.pt`` (one per TP rank; ZeRO 1/2 keep whole weights there), merged."""
    if model["pipeline_model_parallel_size"] > 1:
        raise ConversionError("a DeepSpeed checkpoint with pipeline parallelism is not supported")
    shards = []
    for t in range(model["tensor_model_parallel_size"]):
        path = os.path.join(directory, "deepspeed", "state", f"mp_rank_{t:02d}_model_states.pt")
        if not os.path.isfile(path):
            raise ConversionError(f"checkpoint file {path} is missing: the checkpoint is partial (copy every "
                                  "rank's file, or point --load at a complete checkpoint)")
        state = ckpt.load_rank_file(path)
        if "module" not in state:
            raise ConversionError(f"{path} has no 'module' entry (keys: {sorted(state)[:8]}); not a model checkpoint")
        shards.append(normalize_megatron_names(state["module"]))
    return merge_tp(shards, swiglu=bool(model.get("swiglu")))


def _megatron_model(directory: str, meta: dict) -> Dict[str, torch.Tensor]:
    """A dist_checkpointing checkpoint loaded into a TP=1/PP=1 model: dist_checkpointing does the merge."""
    bf16 = bool(meta.get("args", {}).get("bf16"))
    with SingleProcessMegatron():
        gpt = build_megatron_model(meta["model"], dtype=torch.bfloat16 if bf16 else torch.float32)
        load_dist_checkpoint(gpt, directory)
        # on the host: the model is on the GPU where there is one, the export and the parity check work on CPU
        return {k: v.detach().float().cpu() for k, v in normalize_megatron_names(gpt.state_dict()).items()}


def load_megatron_checkpoint(load: str, iteration: Optional[int] = None) -> Tuple[Dict[str, torch.Tensor], dict, str]:
    """``(full_state_dict, meta, iteration_dir)``: the TP=1/PP=1 view of either backend's checkpoint."""
    if not os.path.isdir(load):
        raise ConversionError(f"--load {load}: no such directory")
    if iteration is None:
        iteration = ckpt.find(load)
        if iteration is None:
            raise ConversionError(f"--load {load}: no checkpoint there ({ckpt.POINTER} not found); pass --iteration "
                                  "N or point at a directory the trainer saved to")
    directory = ckpt.iteration_dir(load, iteration)
    if not os.path.isdir(directory):
        raise ConversionError(f"checkpoint directory {directory} does not exist")
    meta = ckpt.load_meta(load, iteration)
    model = meta.get("model")
    if not model:
        raise ConversionError(f"{directory}/meta.json has no 'model' settings; not a megatron-simreg checkpoint")
    if meta.get("backend", "megatron") == "deepspeed":
        full = _deepspeed_model(directory, model)
    else:
        full = _megatron_model(directory, meta)
    n = sum(1 for k in full if k.endswith("input_layernorm.weight"))
    if n != model["num_layers"]:
        raise ConversionError(f"the checkpoint holds {n} layers but meta.json says num_layers={model['num_layers']}; "
                              "it is partial")
    return full, meta, directory


# ----------------------------------------------------------------------------
# a single-process Megatron model
# ----------------------------------------------------------------------------


class SingleProcessMegatron:
    """Context manager: a gloo world of one (when none exists), TP=PP=1, CPU adaptations on CPU."""

    def __enter__(self):
        import torch.distributed as dist

        self.created_pg = False
        if not dist.is_initialized():
            from ..parallel.process import free_port

            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
            self.created_pg = True
        elif dist.get_world_size() != 1:
            raise ConversionError("conversion runs in a single process; found a process group of "
                                  f"{dist.get_world_size()}")
        if not torch.cuda.is_available():
            from ..megatron.cpu_compat import apply_cpu_adaptations

            apply_cpu_adaptations()
        from megatron.core import parallel_state as ps

        self.created_mp = not ps.model_parallel_is_initialized()
        if self.created_mp:
            ps.initialize_model_parallel(1, 1)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        if self.created_mp:
            ps.destroy_model_parallel()
        if self.created_pg:
            dist.destroy_process_group()
        return False


def build_megatron_model(model: dict, state: Optional[Dict[str, torch.Tensor]] = None, dtype=torch.float32):
    """A TP=PP=1 GPTModel of ``model`` settings, with ``state`` (a full state dict) loaded when given
    (inside :class:`SingleProcessMegatron`).

    ``state`` is in the full view (the local spec's names); the model is whatever :func:`build_gpt` builds on
    this machine: TransformerEngine's spec on a GPU with TE, whose fused norms are named
    ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``. Each tensor is loaded under the
    model's own name for it (:func:`~.layout.megatron_name_map`), onto the model's device."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from ..megatron.model import build_gpt, transformer_config
    from ..training.model_setup import architecture

    model_parallel_cuda_manual_seed(0, force_reset_rng=True)
    shape, overrides, position_embedding_type = architecture(model)
    if shape.num_experts:
        overrides.update(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)
    gpt = build_gpt(shape, transformer_config(shape, dtype=dtype, **overrides),
                    position_embedding_type=position_embedding_type)
    gpt.eval()
    if state is None:
        return gpt
    current = gpt.state_dict()
    own = megatron_name_map(current)  # full-view name -> the model's own name
    if set(own) != set(state):
        raise ConversionError(f"state/model key mismatch: missing {sorted(set(own) - set(state))[:5]}, "
                              f"unexpected {sorted(set(state) - set(own))[:5]}")
    wrong = [f"{k} (shape {tuple(state[k].shape)}, the model's {own[k]} has shape {tuple(current[own[k]].shape)})"
             for k in sorted(state) if tuple(state[k].shape) != tuple(current[own[k]].shape)]
    if wrong:
        raise ConversionError(f"state/model shape mismatch: {'; '.join(wrong[:5])}")
    result = gpt.load_state_dict({own[k]: v.to(dtype) for k, v in state.items()}, strict=False)
    bad = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if bad or result.unexpected_keys:
        raise ConversionError(f"loading into GPTModel: missing {bad[:5]}, unexpected {result.unexpected_keys[:5]}")
    return gpt


def load_dist_checkpoint(gpt, directory: str) -> None:
    """Load the ``"model"`` of a dist_checkpointing checkpoint (any TP/PP layout) into ``gpt``."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        loaded = dist_checkpointing.load({"model": gpt.sharded_state_dict()}, directory)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - any failure means it cannot be read
        raise ConversionError(f"cannot read the Megatron checkpoint {directory} ({ckpt.reason(e)}); it is corrupt "
                              "or incomplete") from e
    gpt.load_state_dict(loaded["model"])


def save_dist_checkpoint(gpt, directory: str) -> None:
    """Write ``gpt``'s weights as a dist_checkpointing checkpoint (model only) that any layout can load."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save({"model": gpt.sharded_state_dict()}, directory)


@torch.no_grad()
def megatron_logits(gpt, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``[batch, seq, vocab]`` of ``gpt`` on ``tokens`` (``[batch, seq]``), computed on the model's
    device (the GPU where there is one) and returned on the device ``tokens`` came on."""
    device = next(gpt.parameters()).device
    ids = tokens.to(device)
    pos = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
    return gpt(ids, pos, None).float().to(tokens.device)
