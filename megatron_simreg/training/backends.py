"""The two optimizer/gradient backends behind one small interface.

* :class:`MegatronBackend`: Megatron-core's DDP, ``get_megatron_optimizer``
  (distributed optimizer on GPU) and ``get_forward_backward_func`` (so
  pipeline parallelism works).
* :class:`DeepSpeedBackend`: the DeepSpeed engine (ZeRO 0/1/2) around the same
  GPTModel, with an ``mpu`` adapter over ``parallel_state``.

A micro-batch is a dict of ``tokens``, ``labels``, ``loss_mask``,
``position_ids``, each ``[micro_batch, s_local]`` (already sliced for CP).
``train_step`` returns the global-batch sums of the LM loss and its token count
on every rank, so logs are the same under any layout, with the gradient norm
and whether the update was applied (a non-finite one is not).
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..megatron import compat
from ..megatron.step import STEP
from ..parallel.comm import comm_device


# The ``metadata`` Megatron-LM passes to ``sharded_state_dict`` and saves as the checkpoint's content metadata (its
# ``_build_sharded_state_dict_metadata``); :func:`sharded_state_dict_metadata` adds the distributed optimizer's format.
SHARDED_STATE_DICT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
# The distributed optimizer's formats (megatron-core 0.16.1 DistributedOptimizer.sharded_state_dict):
# "dp_reshardable" (Megatron-LM's default) writes each rank's flat bucket shards as they are: no gather, but the
# layout of the buckets is the model-parallel rank's, so only the data-parallel size may change on resume.
# "fully_reshardable" (--dist-ckpt-optim-fully-reshardable) gathers the state over DP and stores each parameter's fp32
# main copy and Adam moments in the parameter's own shape, so a resume may change TP/PP/DP.
# ("fully_sharded_model_space" fails in megatron-core 0.16.1: "ShardedTensor.flattened_range is not supported".)
DP_RESHARDABLE, FULLY_RESHARDABLE = "dp_reshardable", "fully_reshardable"


def sharded_state_dict_metadata(args) -> dict:
    """The content metadata a save writes (and records), as Megatron-LM's ``_build_sharded_state_dict_metadata``.

    ``distrib_optim_fully_reshardable_mem_efficient`` is what the save does: on CPU always True (the NCCL path of
    ``DistributedOptimizer.get_parameter_state_dp_zero`` moves each shard to CUDA; the gloo one stays on the CPU).
    """
    metadata = dict(SHARDED_STATE_DICT_METADATA)
    if args.use_distributed_optimizer:
        if args.dist_ckpt_optim_fully_reshardable:
            metadata["distrib_optim_sharding_type"] = FULLY_RESHARDABLE
            metadata["distrib_optim_fully_reshardable_mem_efficient"] = bool(
                args.distrib_optim_fully_reshardable_mem_efficient or not torch.cuda.is_available())
        else:
            metadata["distrib_optim_sharding_type"] = DP_RESHARDABLE
    return metadata


def _lm_loss_func(mb):
    mask = mb["loss_mask"].float()

    def loss_func(per_token):
        total = (per_token.float() * mask).sum()
        n = mask.sum().to(torch.int)
        return total, n, {"lm": torch.stack([total.detach(), mask.sum()])}

    return loss_func


_PLANT_NAN = {"on": False}


@contextlib.contextmanager
def planted_nan_grad(on: bool):
    """Test hook (trainer.NAN_GRAD_ENV): inside, the model's output passes NaN gradients back, the loss stays finite."""
    _PLANT_NAN["on"] = on
    try:
        yield
    finally:
        _PLANT_NAN["on"] = False


def _forward(model, mb):
    out = model(mb["tokens"], mb["position_ids"], mb.get("attention_mask"), labels=mb["labels"],
                loss_mask=mb["loss_mask"])
    if _PLANT_NAN["on"] and out.requires_grad:
        out.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    return out


def _all_finite(tensors, local_ok: bool = True) -> bool:
    """Whether ``tensors`` are finite on every rank (a collective over the world; one host sync).

    One reduction per tensor and no tensor-sized temporary (``isfinite(t)`` would allocate a bool per element: about
    8 GB for an 8B model's grad buffers). The max-norm is finite exactly when every element is (NaN propagates
    through the max), and, unlike the 2-norm DDP's own check uses, it cannot overflow on finite values.
    """
    norms = [torch.linalg.vector_norm(t, ord=float("inf")).reshape(1) for t in tensors if t is not None and t.numel()]
    ok = torch.isfinite(torch.cat(norms)).all() if norms else torch.tensor(True)
    bad = (~ok).float().reshape(1).to(comm_device()) + (0.0 if local_ok else 1.0)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item() == 0)


def _global_sums(local: torch.Tensor) -> torch.Tensor:
    """Sum ``[lm_sum, n_tok]`` over the last PP stage and all DP x CP ranks; every rank gets it, on the CPU."""
    from megatron.core import parallel_state as ps

    local = local.detach().to(comm_device(), torch.float32, copy=True)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(local, group=ps.get_pipeline_model_parallel_group())  # other stages contribute zeros
    if ps.get_data_parallel_world_size(with_context_parallel=True) > 1:
        dist.all_reduce(local, group=ps.get_data_parallel_group(with_context_parallel=True))
    return local.cpu()


def _scheduler(optimizer, args):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.train_iters, lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=args.train_iters, wd_incr_style="constant",
        # resume_checks.check_schedule has refused a mismatch that neither flag settles
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
    )


class MegatronBackend:
    def __init__(self, args, model, config):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.args, self.config = args, config
        ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=args.use_distributed_optimizer,
                                                   overlap_grad_reduce=False, grad_reduce_in_fp32=True)
        self.model = DistributedDataParallel(config, ddp_config, model)
        config.finalize_model_grads_func = finalize_model_grads
        opt_config = OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
            bf16=args.bf16, params_dtype=config.params_dtype, use_distributed_optimizer=args.use_distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(opt_config, [self.model])
        self.scheduler = _scheduler(self.optimizer, args)
        # megatron-core 0.16.1's reload of the distributed optimizer: torch's AdamW (no TE or apex: CPU, or a GPU
        # image without them) loses its 'step', and the default dp_reshardable format copies in place under autograd
        compat.keep_torch_adam_step()
        compat.load_dp_reshardable_without_grad()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _run(self, microbatches: List[Dict], forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            return _forward(model, mb), _lm_loss_func(mb)

        mb0 = microbatches[0]
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(microbatches), model=[self.model],
            # the full length: the schedule divides it by CP (and TP with SP) for its p2p buffers
            num_microbatches=len(microbatches), seq_length=self.args.seq_length,
            micro_batch_size=mb0["tokens"].shape[0], forward_only=forward_only,
        )
        return _global_sums(torch.stack([x["lm"] for x in out]).sum(0) if out else torch.zeros(2))

    def train_step(self, microbatches):
        """One global batch; returns ``(sums, grad_norm, applied)``.

        Megatron-LM's ``--check-for-nan-in-loss-and-grad``, done before the
        update rather than by raising inside the gradient all-reduce (which
        leaves the other ranks waiting): when any rank's loss or reduced
        gradient is not finite, the optimizer and the schedule do not step.
        """
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        sums = self._run(microbatches, forward_only=False)
        # one check per contiguous grad buffer (DDP's own list, as its zero_grad_buffer walks it), not per parameter
        grads = [buffer.grad_data for buffer in self.model.buffers + self.model.expert_parallel_buffers]
        if not _all_finite(grads, local_ok=bool(torch.isfinite(sums).all())):
            return sums, float("nan"), False
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        return sums, float(grad_norm) if grad_norm is not None else float("nan"), True

    @torch.no_grad()
    def eval_step(self, microbatches):
        self.model.eval()
        return self._run(microbatches, forward_only=True)

    # Megatron's checkpoint: megatron-core dist_checkpointing (format torch_dist), Megatron-LM's state dict keys.
    reshardable = True  # dist_checkpointing reshards on load: any TP/PP/DP layout may resume it

    def _sharded_state_dict(self, iteration: int, is_loading: bool, optim: bool, rng: bool,
                            metadata: dict) -> dict:
        """``{"model", "optimizer", "opt_param_scheduler", "rng_state", ...}`` as Megatron-LM's ``generate_state_dict``.

        Tensors are ``ShardedTensor``s (global shape + this rank's offsets), so
        a load at another layout takes its own slices; DP replicas are written
        by one rank only. ``metadata``: what a save writes
        (:func:`sharded_state_dict_metadata`), or the checkpoint's own content
        metadata on a load (a load follows the format it was written in).
        """
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        from .checkpoint import rng_state

        metadata = {**metadata, "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
        state = {"checkpoint_version": 3.0, "iteration": iteration,
                 "model": self.model.module.sharded_state_dict(metadata=metadata)}
        if optim:
            state["optimizer"] = self.optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
            state["opt_param_scheduler"] = self.scheduler.state_dict()
        if rng:  # one per (PP, TP) rank as in Megatron-LM: the DP ranks' RNG states are the same
            state["rng_state"] = ShardedObject(
                "rng_state", [rng_state()], (ps.get_pipeline_model_parallel_world_size(),
                                             ps.get_tensor_model_parallel_world_size()),
                (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                replica_id=ps.get_data_parallel_rank(with_context_parallel=True))
        return state

    def write_checkpoint(self, directory: str, iteration: int) -> None:
        from megatron.core import dist_checkpointing
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

        metadata = sharded_state_dict_metadata(self.args)
        state = self._sharded_state_dict(iteration, is_loading=False, optim=True, rng=True, metadata=metadata)
        # Megatron-LM's --ckpt-fully-parallel-save (its default): DP replicas share the writing
        strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy("torch_dist"),
                                                    ps.get_data_parallel_group(with_context_parallel=True))
        # the format written, for the load (and Megatron-LM's load_checkpoint) to follow
        dist_checkpointing.save(state, directory, strategy, content_metadata=metadata)

    def _init_distributed_optimizer_state(self) -> None:
        """Give a fresh DistributedOptimizer the Adam state its ``sharded_state_dict`` reads.

        Its ``state_dict()`` asserts on each param's ``"step"``, which torch's
        AdamW (the optimizer without TE/apex, as on CPU) makes only at its
        first step. megatron-core's own remedy (used before its FSDP loads):
        one step on zero gradients. The load then overwrites all it touched.
        """
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
                opt._init_optimizer_states_with_dummy_values()

    def read_checkpoint(self, directory: str, load_optim: bool, load_rng: bool) -> None:
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.api import CheckpointException

        from .checkpoint import CheckpointError, reason, set_rng_state

        if load_optim:
            self._init_distributed_optimizer_state()
        try:
            # a checkpoint without content metadata (none this trainer wrote) is read as Megatron-LM reads one
            saved = dist_checkpointing.load_content_metadata(directory) or dict(SHARDED_STATE_DICT_METADATA)
            state = self._sharded_state_dict(0, is_loading=True, optim=load_optim, rng=load_rng, metadata=saved)
            loaded = dist_checkpointing.load(state, directory)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - whatever failed, it cannot be resumed
            raise CheckpointError(f"cannot read checkpoint {directory} ({reason(e)}); it is corrupt, incomplete "
                                  "or not a Megatron torch_dist checkpoint: point --load at another checkpoint") from e
        self.model.module.load_state_dict(loaded["model"])
        if load_optim:
            self.optimizer.load_state_dict(loaded["optimizer"])
            if self.args.override_opt_param_scheduler:
                # megatron-core's param groups carry max_lr/min_lr, which the scheduler prefers to its own: the
                # checkpoint's would silently win over the flags
                for group in self.optimizer.param_groups:
                    group["max_lr"], group["min_lr"] = self.args.lr, self.args.min_lr
            self.scheduler.load_state_dict(loaded["opt_param_scheduler"])
        else:
            # The mixed-precision optimizer's fp32 main params still hold the initial weights; its next
            # step would copy them back over the loaded model.
            self.optimizer.reload_model_params()
        if load_rng:
            set_rng_state(loaded["rng_state"][0])


class _MegatronMpu:
    """What DeepSpeed asks of an ``mpu``, answered by Megatron's ``parallel_state``.

    DeepSpeed calls ``get_model_parallel_*``, which ``parallel_state`` lacks; its
    data-parallel group must include context parallelism, since CP ranks hold
    the same samples' gradients to be averaged.
    """

    def __getattr__(self, name):
        from megatron.core import parallel_state as ps

        mapping = {
            "get_model_parallel_rank": ps.get_tensor_model_parallel_rank,
            "get_model_parallel_world_size": ps.get_tensor_model_parallel_world_size,
            "get_model_parallel_group": ps.get_tensor_model_parallel_group,
            "get_data_parallel_rank": lambda: ps.get_data_parallel_rank(with_context_parallel=True),
            "get_data_parallel_world_size": lambda: ps.get_data_parallel_world_size(with_context_parallel=True),
            "get_data_parallel_group": lambda: ps.get_data_parallel_group(with_context_parallel=True),
        }
        if name in mapping:
            return mapping[name]
        return getattr(ps, name)


class DeepSpeedBackend:
    def __init__(self, args, model, config, num_microbatches: int):
        import deepspeed
        from megatron.core import parallel_state as ps

        self.args, self.config, self.num_microbatches = args, config, num_microbatches
        decay = [p for n, p in model.named_parameters() if p.dim() > 1]
        no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
        base = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
        ds_config = {
            "train_micro_batch_size_per_gpu": args.micro_batch_size,
            "gradient_accumulation_steps": num_microbatches,
            "zero_optimization": {"stage": args.zero_stage},
            "gradient_clipping": args.clip_grad,
            "bf16": {"enabled": bool(args.bf16)},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        if ps.get_tensor_model_parallel_world_size() > 1:
            self._reduce_tp_summed_grads(model)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=base, config=ds_config, mpu=_MegatronMpu())
        self.base_optimizer = base
        self.scheduler = _scheduler(base, args)
        # Keep scheduler-managed weight decay off the no-decay group.
        base.param_groups[1]["wd_mult"] = 0.0

    @staticmethod
    def _reduce_tp_summed_grads(model):
        """Sum over TP the grads finalize_model_grads sums and DeepSpeed does not: SP-flagged params, and the
        QK-norm weights (each TP rank normalizes its own heads with them), by finalize_model_grads' own rule."""
        from megatron.core import parallel_state as ps

        group = ps.get_tensor_model_parallel_group()
        qk_layernorm = model.config.qk_layernorm
        for name, p in model.named_parameters():
            if getattr(p, "sequence_parallel", False) or (
                    qk_layernorm and ("q_layernorm" in name or "k_layernorm" in name)):
                def hook(grad, group=group):
                    grad = grad.clone()
                    dist.all_reduce(grad, group=group)
                    return grad
                p.register_hook(hook)

    @property
    def lr(self) -> float:
        return self.base_optimizer.param_groups[0]["lr"]

    def train_step(self, microbatches):
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        self.engine.train()
        # DeepSpeed divides the main loss by the accumulation steps; the
        # auxiliary losses bypass that division, so scale them here.
        STEP.num_microbatches, STEP.grad_scale_func = len(microbatches), None
        # megatron-core's forward_step rule for a per-micro-batch-mean loss: cp / M. DeepSpeed averages grads
        # over DP x CP, and each CP rank's aux loss is the whole micro-batch's, hence the cp.
        scale = ps.get_context_parallel_world_size() / len(microbatches)
        # on the model's device: Megatron multiplies the aux-loss gradient by it in backward
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        MoEAuxLossAutoScaler.set_loss_scale(torch.full((1,), scale, device=dev))
        sums = []  # kept on the device: a .cpu() per micro-batch would wait for it
        for mb in microbatches:
            per_token = _forward(self.engine, mb)
            mask = mb["loss_mask"].float()
            total = (per_token.float() * mask).sum()
            self.engine.backward(total / mask.sum().clamp_min(1))
            self.engine.step()
            sums.append(torch.stack([total.detach(), mask.sum()]))
        self.scheduler.step(increment=1)
        grad_norm = self.engine.get_global_grad_norm()
        # ZeRO 1/2 skip a step whose gradient norm is not finite (fp32, and bf16 with its default
        # check_grad_overflow) and say so in ``overflow``; the trainer then stops without saving.
        applied = not getattr(self.engine.optimizer, "overflow", False)
        # None: DeepSpeed did not compute one (ZeRO-0 without clipping)
        return (_global_sums(torch.stack(sums).sum(0)), float(grad_norm) if grad_norm is not None else None, applied)

    @torch.no_grad()
    def eval_step(self, microbatches):
        self.engine.eval()
        sums = []
        for mb in microbatches:
            per_token = _forward(self.engine, mb)
            mask = mb["loss_mask"].float()
            sums.append(torch.stack([(per_token.float() * mask).sum(), mask.sum()]))
        return _global_sums(torch.stack(sums).sum(0))

    # DeepSpeed's own engine checkpoint (see training/checkpoint.py for why), and a file of RNG states per rank
    reshardable = False

    def write_checkpoint(self, directory: str, iteration: int) -> None:
        from .checkpoint import rng_state

        self.engine.save_checkpoint(os.path.join(directory, "deepspeed"), tag="state",
                                    client_state={"scheduler": self.scheduler.state_dict()}, save_latest=False)
        torch.save(rng_state(), os.path.join(directory, f"rng_{dist.get_rank():05d}.pt"))

    def read_checkpoint(self, directory: str, load_optim: bool, load_rng: bool) -> None:
        from .checkpoint import CheckpointError, load_rank_file, reason, set_rng_state

        # DeepSpeed reads its own files (TorchCheckpointEngine.load: torch.load(weights_only=False) in 0.19); it
        # offers no weights_only switch, so a DeepSpeed checkpoint must come from a trusted source. Our RNG file
        # below is read with weights_only=True.
        try:
            path, client = self.engine.load_checkpoint(os.path.join(directory, "deepspeed"), tag="state",
                                                       load_optimizer_states=load_optim,
                                                       load_lr_scheduler_states=False)
        except Exception as e:  # noqa: BLE001 - whatever failed, this checkpoint cannot be resumed
            bad = unreadable_files(os.path.join(directory, "deepspeed", "state"))
            what = (f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} corrupt or incomplete" if bad
                    else "a file of it is unreadable")
            raise CheckpointError(f"cannot load DeepSpeed checkpoint {directory}: {what} ({reason(e)}); point --load "
                                  "at another checkpoint") from e
        if path is None:
            raise CheckpointError(f"DeepSpeed found no loadable state in {directory}/deepspeed; the checkpoint is "
                                  "incomplete or was written by the Megatron backend (drop --deepspeed)")
        if load_optim:
            self.scheduler.load_state_dict(client["scheduler"])
        if load_rng:
            set_rng_state(load_rank_file(os.path.join(directory, f"rng_{dist.get_rank():05d}.pt")))


def unreadable_files(directory: str) -> List[str]:
    """The ``.pt`` files under ``directory`` that are not complete torch archives (truncated, empty).

    DeepSpeed's ``load_checkpoint`` fails without naming the file; a torch
    archive is a zip, whose directory sits at its end, so a cut-off file fails
    this check cheaply, without loading any tensor.
    """
    import zipfile

    bad = []
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name.endswith(".pt") and not zipfile.is_zipfile(path):
                bad.append(path)
    return sorted(bad)
