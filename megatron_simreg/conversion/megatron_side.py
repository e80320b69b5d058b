"""Reading our checkpoints (both backends) into one full state dict, and building a single-process
Megatron model for parity checks."""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from ..training import checkpoint as ckpt
from .layout import ConversionError, merge_pp, merge_tp, normalize_megatron_names

DEFAULT_ROTARY_BASE = 10000.0
DEFAULT_EPS = 1e-5


def _rank_table(meta: dict) -> list:
    m = meta["model"]
    tp, pp = m["tensor_model_parallel_size"], m["pipeline_model_parallel_size"]
    if meta.get("ranks"):
        return meta["ranks"]
    # Megatron's default order tp-cp-ep-dp-pp (tp fastest)
    dp = m.get("data_parallel_size", 1)
    return [{"rank": t + tp * d + tp * dp * p, "tp": t, "pp": p, "cp": 0, "dp": d}
            for p in range(pp) for d in range(dp) for t in range(tp)]


def _load(path: str, key: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ConversionError(f"checkpoint file {path} is missing: the checkpoint is partial (copy every rank's "
                              "file, or point --load at a complete checkpoint)")
    state = ckpt.load_rank_file(path)
    if key not in state:
        raise ConversionError(f"{path} has no {key!r} entry (keys: {sorted(state)[:8]}); not a model checkpoint")
    return state[key]


def load_megatron_checkpoint(load: str, iteration: Optional[int] = None) -> Tuple[Dict[str, torch.Tensor], dict, str]:
    """``(full_state_dict, meta, iteration_dir)``: TP shards concatenated, PP stages renumbered."""
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
    tp, pp = model["tensor_model_parallel_size"], model["pipeline_model_parallel_size"]
    backend = meta.get("backend", "megatron")
    table = _rank_table(meta)
    chosen = {}
    for row in table:
        if row.get("dp", 0) == 0 and row.get("cp", 0) == 0:
            chosen[(row["pp"], row["tp"])] = row["rank"]
    missing = [(p, t) for p in range(pp) for t in range(tp) if (p, t) not in chosen]
    if missing:
        raise ConversionError(f"{directory}/meta.json 'ranks' lacks (pp, tp) = {missing}")
    stages = []
    for p in range(pp):
        shards = []
        for t in range(tp):
            if backend == "deepspeed":
                if pp > 1:
                    raise ConversionError("a DeepSpeed checkpoint with pipeline parallelism is not supported")
                path = os.path.join(directory, "deepspeed", "state", f"mp_rank_{t:02d}_model_states.pt")
                sd = _load(path, "module")
            else:
                sd = _load(os.path.join(directory, f"rank_{chosen[(p, t)]:05d}.pt"), "model")
            shards.append(normalize_megatron_names(sd))
        stages.append(merge_tp(shards, swiglu=bool(model.get("swiglu"))))
    tied = not model.get("untie_embeddings_and_output_weights", False)
    full = merge_pp(stages, tied)
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


def build_megatron_model(model: dict, state: Dict[str, torch.Tensor]):
    """A TP=PP=1 fp32 GPTModel of ``model`` settings with ``state`` loaded (inside :class:`SingleProcessMegatron`)."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from ..megatron.model import GPTShape, layer_spec, transformer_config

    model_parallel_cuda_manual_seed(0, force_reset_rng=True)
    shape = GPTShape(num_layers=model["num_layers"], hidden_size=model["hidden_size"],
                     ffn_hidden_size=model["ffn_hidden_size"], num_attention_heads=model["num_attention_heads"],
                     num_query_groups=model["num_query_groups"], vocab_size=model["padded_vocab_size"],
                     seq_length=model["seq_length"], num_experts=model.get("num_experts"),
                     moe_router_topk=model.get("moe_router_topk", 2),
                     untie_embeddings=model.get("untie_embeddings_and_output_weights", False))
    extra = {}
    if model.get("num_experts"):
        extra = dict(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)
    config = transformer_config(shape, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
                                layernorm_epsilon=model.get("layernorm_epsilon", DEFAULT_EPS), **extra)
    gpt = GPTModel(config=config, transformer_layer_spec=layer_spec(config), vocab_size=shape.vocab_size,
                   max_sequence_length=shape.seq_length, pre_process=True, post_process=True,
                   share_embeddings_and_output_weights=not shape.untie_embeddings, position_embedding_type="rope",
                   rotary_base=model.get("rotary_base", DEFAULT_ROTARY_BASE))
    own = normalize_megatron_names(gpt.state_dict())
    if set(own) != set(state):
        raise ConversionError(f"state/model key mismatch: missing {sorted(set(own) - set(state))[:5]}, "
                              f"unexpected {sorted(set(state) - set(own))[:5]}")
    result = gpt.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    bad = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if bad or result.unexpected_keys:
        raise ConversionError(f"loading into GPTModel: missing {bad[:5]}, unexpected {result.unexpected_keys[:5]}")
    gpt.eval()
    return gpt


@torch.no_grad()
def megatron_logits(gpt, tokens: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return gpt(tokens, pos, None).float()
