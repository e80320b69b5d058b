"""Helpers for running Megatron-core GPTModel on CPU with gloo in tests.

* :func:`run_distributed` runs a picklable callable ``fn(rank, world_size, *args)``
  in ``world_size`` spawned gloo processes (free TCP port, hard timeout, per-rank
  results returned through files; never hangs: stragglers are killed).
* :func:`build_tiny_gpt` builds a tiny GPTModel for a TP/PP/SP/MoE layout with
  weights that depend only on the *global* parameter name, so different layouts
  start from identical weights.
* :func:`gather_full_grads` returns unsharded gradients keyed by global name.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.multiprocessing as mp

from megatron_simreg.parallel.process import free_port

# ----------------------------------------------------------------------------
# process launching
# ----------------------------------------------------------------------------


def _worker(fn, rank, world_size, port, out_dir, pg_timeout_s, args):
    result_path = os.path.join(out_dir, f"rank{rank}.pkl")
    payload: Dict[str, Any]
    try:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        os.environ["WORLD_SIZE"] = str(world_size)
        os.environ["RANK"] = str(rank)
        os.environ["LOCAL_RANK"] = str(rank)
        torch.set_num_threads(1)
        import warnings
        from datetime import timedelta

        warnings.filterwarnings("ignore")
        torch.distributed.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=pg_timeout_s),
        )
        from megatron_simreg.megatron.cpu_compat import apply_cpu_adaptations

        apply_cpu_adaptations()
        payload = {"ok": True, "result": fn(rank, world_size, *args)}
    except BaseException:  # noqa: BLE001 - report everything to the parent
        payload = {"ok": False, "error": traceback.format_exc()}
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:
            pass
        try:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        except Exception:
            pass
    with open(result_path + ".tmp", "wb") as f:
        pickle.dump(payload, f)
    os.replace(result_path + ".tmp", result_path)


def _payload_failed(path: str) -> bool:
    if not os.path.exists(path):
        return True
    try:
        with open(path, "rb") as f:
            return not pickle.load(f)["ok"]
    except Exception:
        return True


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    timeout: float = 120.0,
) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes.

    ``fn`` must be picklable (module-level).  Returns the per-rank return
    values (which must be picklable; tensors are fine).  Raises
    ``RuntimeError`` with the remote traceback(s) if any rank fails, and
    ``TimeoutError`` (after killing all ranks) if they do not finish within
    ``timeout`` seconds.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mcore_cpu_") as out_dir:
        procs = []
        for rank in range(world_size):
            p = ctx.Process(
                target=_worker,
                args=(fn, rank, world_size, port, out_dir, max(10, int(timeout)), tuple(args)),
                daemon=True,
            )
            p.start()
            procs.append(p)
        deadline = time.monotonic() + timeout
        timed_out = False
        failed_at = None  # once a rank has failed, give the others a short grace period
        checked = set()
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if now > deadline or (failed_at is not None and now > failed_at + 5.0):
                timed_out = failed_at is None
                break
            if failed_at is None:
                for rank, p in enumerate(procs):
                    if rank in checked or p.is_alive():
                        continue
                    checked.add(rank)
                    if p.exitcode != 0 or _payload_failed(os.path.join(out_dir, f"rank{rank}.pkl")):
                        failed_at = now
                        break
            time.sleep(0.05)
        if any(p.is_alive() for p in procs):
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(5)
        results, errors = [], []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {rank}: no result (exitcode {procs[rank].exitcode})")
                results.append(None)
                continue
            with open(path, "rb") as f:
                payload = pickle.load(f)
            if payload["ok"]:
                results.append(payload["result"])
            else:
                errors.append(f"rank {rank} failed:\n{payload['error']}")
                results.append(None)
        if timed_out:
            raise TimeoutError(
                f"distributed run did not finish within {timeout}s\n" + "\n".join(errors)
            )
        if errors:
            raise RuntimeError("\n".join(errors))
        return results


# ----------------------------------------------------------------------------
# tiny GPT model
# ----------------------------------------------------------------------------

TINY = dict(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=64,
    vocab_size=64,
    seq_length=16,
)


def make_config(
    tp: int = 1,
    pp: int = 1,
    sp: bool = False,
    num_experts: Optional[int] = None,
    normalization: str = "RMSNorm",
    **overrides,
):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=TINY["num_layers"],
        hidden_size=TINY["hidden_size"],
        num_attention_heads=TINY["num_attention_heads"],
        num_query_groups=TINY["num_query_groups"],
        ffn_hidden_size=TINY["ffn_hidden_size"],
        normalization=normalization,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sp,
        # CUDA-only fusions off
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
    if num_experts:
        kwargs.update(
            num_moe_experts=num_experts,
            moe_router_topk=2,
            moe_ffn_hidden_size=TINY["ffn_hidden_size"],
            moe_aux_loss_coeff=0.0,
            moe_router_load_balancing_type="none",
            moe_token_dispatcher_type="allgather",
            moe_grouped_gemm=False,
            expert_model_parallel_size=1,
        )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_tiny_gpt(
    tp: int = 1,
    pp: int = 1,
    sp: bool = False,
    num_experts: Optional[int] = None,
    seed: int = 1234,
    share_embeddings: bool = True,
    init_parallel: bool = True,
    **config_overrides,
):
    """Initialise model parallel state (if ``init_parallel``) and build the tiny GPTModel.

    Weights are re-initialised from the global parameter name (see
    :func:`init_params_by_global_name`), so they are identical for every
    TP/PP layout.  Returns ``(model, config)``.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_simreg.megatron.cpu_compat import get_cpu_gpt_layer_spec

    if init_parallel:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=1,
        )
    model_parallel_cuda_manual_seed(seed)
    config = make_config(tp=tp, pp=pp, sp=sp, num_experts=num_experts, **config_overrides)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_cpu_gpt_layer_spec(
            num_experts=num_experts, normalization=config.normalization
        ),
        vocab_size=TINY["vocab_size"],
        max_sequence_length=TINY["seq_length"],
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=share_embeddings,
        position_embedding_type="rope",
    )
    init_params_by_global_name(model, seed=seed, std=0.05, perturb_norms=True)
    return model, config


from megatron_simreg.megatron.init import (  # noqa: E402  (layout-independent init lives in the package)
    _is_tp_sharded,
    _tp_group_for,
    _unshard,
    global_param_names,
    init_params_by_global_name,
)


def gather_full_grads(model) -> Dict[str, torch.Tensor]:
    """Unsharded gradients of every parameter, keyed by global (PP=1) name.

    TP-sharded params (``tensor_model_parallel`` / ``partition_dim`` /
    ``partition_stride``) are all-gathered over their TP group (expert TP
    group for expert params) and reassembled; PP stages exchange their dicts
    with ``all_gather_object`` so every rank returns the full set.  Grads of
    params flagged ``sequence_parallel`` must already be all-reduced across TP
    (see ``cpu_compat.allreduce_sequence_parallel_grads``).  Collective: call
    on all ranks.
    """
    from megatron.core import parallel_state

    names = global_param_names(model)
    local: Dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if grad is None:
            grad = getattr(param, "main_grad", None)
        grad = torch.zeros_like(param) if grad is None else grad.detach().clone()
        if _is_tp_sharded(param):
            group = _tp_group_for(param)
            world = torch.distributed.get_world_size(group)
            if world > 1:
                shards = [torch.empty_like(grad) for _ in range(world)]
                torch.distributed.all_gather(shards, grad.contiguous(), group=group)
                grad = _unshard(shards, param.partition_dim, getattr(param, "partition_stride", 1))
        gname = names[name]
        if gname not in local:  # tied weight on the last stage is a duplicate
            local[gname] = grad
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_world = torch.distributed.get_world_size(pp_group)
    if pp_world == 1:
        return local
    gathered: List[Optional[Dict[str, torch.Tensor]]] = [None] * pp_world
    torch.distributed.all_gather_object(gathered, local, group=pp_group)
    full: Dict[str, torch.Tensor] = {}
    for stage_dict in gathered:  # first stage first: its copy of a tied weight wins
        for k, v in stage_dict.items():
            full.setdefault(k, v)
    return full


def allreduce_tied_embedding_grads(model) -> None:
    """SUM-all-reduce the grad of the tied embedding/output weight across first/last PP stage."""
    from megatron.core import parallel_state

    if not getattr(model, "share_embeddings_and_output_weights", False):
        return
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    if not parallel_state.is_rank_in_embedding_group():
        return
    weight = model.shared_embedding_or_output_weight()
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    torch.distributed.all_reduce(weight.grad, group=parallel_state.get_embedding_group())


def finalize_grads_no_ddp(model) -> None:
    """What Megatron's finalize_model_grads does for un-wrapped models (no DP):
    SP-flagged grads across TP, tied embedding grads across first/last stage."""
    from megatron_simreg.megatron.cpu_compat import allreduce_sequence_parallel_grads

    allreduce_sequence_parallel_grads(model)
    allreduce_tied_embedding_grads(model)


# ----------------------------------------------------------------------------
# data / loss
# ----------------------------------------------------------------------------


def make_batch(batch_size: int, seed: int = 7, seq_length: Optional[int] = None):
    seq_length = seq_length or TINY["seq_length"]
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY["vocab_size"], (batch_size, seq_length + 1), generator=gen)
    input_ids = tokens[:, :-1].contiguous()
    labels = tokens[:, 1:].contiguous()
    position_ids = torch.arange(seq_length).unsqueeze(0).expand(batch_size, -1).contiguous()
    return input_ids, position_ids, labels


def lm_loss(model, input_ids, position_ids, labels) -> torch.Tensor:
    """Per-token loss from GPTModel (labels given), reduced as sum / num-tokens."""
    per_token = model(input_ids, position_ids, attention_mask=None, labels=labels)
    return per_token.sum() / per_token.numel()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double()
    b = b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
