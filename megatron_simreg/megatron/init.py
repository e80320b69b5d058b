"""Layout-independent weights: every parameter is a function of its global name.

Megatron's own initialization draws from one RNG stream per pipeline stage,
so a PP=2 run starts from different weights than a PP=1 run. Here each
parameter's full (unsharded) tensor is drawn from a generator seeded by
``(seed, global name)`` and then sliced for this rank, so every TP/PP layout
starts from identical weights and logs the same losses. The same helpers
also reassemble full tensors from shards (checkpoint export, tests).
"""

from __future__ import annotations

import math
import zlib
from typing import Dict, List, Optional

import torch

from .param_names import BIAS, NORM, OUTPUT_PROJ, param_role


def global_param_names(model) -> Dict[str, str]:
    """Map local parameter name -> global (PP=1) name.

    Decoder layers are renumbered with their global ``layer_number``; on a
    non-first PP stage the tied output weight (``output_layer.weight``) maps
    to ``embedding.word_embeddings.weight``.
    """
    layer_map = {}
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        for i, layer in enumerate(decoder.layers):
            layer_map[i] = layer.layer_number - 1
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    out = {}
    for name, _ in model.named_parameters():
        gname = name
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
            parts[2] = str(layer_map[int(parts[2])])
            gname = ".".join(parts)
        if tied and name == "output_layer.weight":
            gname = "embedding.word_embeddings.weight"
        out[name] = gname
    return out


def _tp_group_for(param):
    from megatron.core import parallel_state

    if not getattr(param, "allreduce", True):  # expert parameter
        return parallel_state.get_expert_tensor_parallel_group()
    return parallel_state.get_tensor_model_parallel_group()


def _is_tp_sharded(param) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False)) and getattr(
        param, "partition_dim", -1
    ) >= 0


def _shard(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    chunks = torch.chunk(full, world * stride, dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)


def _unshard(shards: List[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    world = len(shards)
    per = [torch.chunk(s, stride, dim=dim) for s in shards]
    return torch.cat([per[r][s] for s in range(stride) for r in range(world)], dim=dim)


def init_params_by_global_name(model, seed: int = 0, std: float = 0.02, num_layers: Optional[int] = None,
                               perturb_norms: bool = False) -> None:
    """Set every parameter to a value determined by ``(seed, global name, full shape)``.

    Matrices get ``N(0, std)``; with ``num_layers`` the output projections
    (``linear_proj``, ``linear_fc2``) get Megatron's scaled ``std / sqrt(2 L)``.
    Norm weights are 1 (``1 + N(0, std)`` with ``perturb_norms``, which tests
    use so that norm gradients matter); biases are 0.
    """
    names = global_param_names(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            gname = names[name]
            world, rank, dim, stride = 1, 0, 0, 1
            if _is_tp_sharded(param):
                group = _tp_group_for(param)
                world = torch.distributed.get_world_size(group)
                rank = torch.distributed.get_rank(group)
                dim = param.partition_dim
                stride = getattr(param, "partition_stride", 1)
            full_shape = list(param.shape)
            full_shape[dim] *= world
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(gname.encode()))
            noise = torch.randn(full_shape, generator=gen, dtype=torch.float32)
            role = param_role(gname)  # sees TE's fused norm names (linear_qkv.layer_norm_weight)
            if role == BIAS:
                full = noise * std if perturb_norms else torch.zeros(full_shape)
            elif role == NORM:
                full = 1.0 + noise * std if perturb_norms else torch.ones(full_shape)
            elif num_layers and role == OUTPUT_PROJ:
                full = noise * (std / math.sqrt(2.0 * num_layers))
            else:
                full = noise * std
            local = _shard(full, dim, stride, rank, world) if world > 1 else full
            param.copy_(local.to(param.dtype))
