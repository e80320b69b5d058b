"""``megatron-simreg train``: a plain pretraining loop over Megatron-core's GPTModel.

One iteration = one global batch of ``--global-batch-size`` samples. The
pieces around the loop live in their own modules: the model
(:mod:`.model_setup`), the data (:mod:`.data`), the optimizer and gradients
(:mod:`.backends`), checkpoints (:mod:`.checkpoint`), stop signals
(:mod:`.signals`) and metrics (:mod:`.metrics`).
"""

from __future__ import annotations

import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from .. import known_warnings
from ..config import JRegConfig, SimRegConfig
from ..megatron.init import init_params_by_global_name
from ..parallel.comm import comm_device
from ..parallel.process import init_distributed, shutdown_distributed
from . import checkpoint as ckpt
from .backends import DeepSpeedBackend, MegatronBackend, planted_nan_grad
from .data import Batches, build_datasets
from .metrics import MetricsWriter, mem_gb, moe_aux_loss, tflops
from .model_setup import build_model, model_settings, padded_vocab
from .resume_checks import check_data, check_schedule, data_settings
from .signals import install_signal_handlers, signal_received


class TrainingStopped(RuntimeError):
    """A run stopped on purpose (a non-finite loss or gradient), keeping its last good checkpoint."""


# Test hook: set to an iteration number to make that iteration's gradients NaN while its loss stays finite
# (tests/test_faults.py).
NAN_GRAD_ENV = "MEGATRON_SIMREG_NAN_GRAD_AT"


def _all_sum(values, group=None):
    t = torch.tensor(values, dtype=torch.float64, device=comm_device(group))
    if dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t.tolist()


def run(args) -> dict:
    """Train; returns the last logged record. Every rank calls it.

    A process group this call started is destroyed when the run ends normally, after every rank is done: a process
    that exits with its group alive races the other ranks' teardown (NCCL warns that it may hang). After an error
    the ranks may be out of step, so it is left to the process's exit."""
    owned = not dist.is_initialized()
    last = _train(args)
    if owned:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        shutdown_distributed()
    return last


def _train(args) -> dict:
    init_distributed()
    install_signal_handlers()
    if dist.get_rank() == 0 and (line := known_warnings.notice()):
        print(line, flush=True)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        if args.context_parallel_size > 1:
            raise ValueError("--context-parallel-size > 1 needs TransformerEngine attention on CUDA; on CPU, context "
                             "parallelism is covered by the loss-level tests only")
        from ..megatron.cpu_compat import apply_cpu_adaptations

        apply_cpu_adaptations()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from ..megatron import apply_to_megatron, begin_step, count_step_anchors, report_losses, undo_megatron_patch

    world = dist.get_world_size()
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size
    if world % model_parallel:
        raise ValueError(f"world size {world} is not divisible by TP x PP x CP = {model_parallel}")
    ps.initialize_model_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                 pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                                 context_parallel_size=args.context_parallel_size)
    dp = ps.get_data_parallel_world_size()
    gbs = args.global_batch_size or args.micro_batch_size * dp
    if gbs % (args.micro_batch_size * dp):
        raise ValueError(f"--global-batch-size {gbs} must be a multiple of --micro-batch-size x data-parallel size "
                         f"({args.micro_batch_size} x {dp})")
    num_micro = gbs // (args.micro_batch_size * dp)
    if args.eval_tokens:  # a validation budget in tokens, whatever the batch shape
        args.eval_iters = max(2, math.ceil(args.eval_tokens / (gbs * args.seq_length)))
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)

    if args.save and dist.get_rank() == 0:
        ckpt.check_writable(args.save)
    Backend = DeepSpeedBackend if args.deepspeed else MegatronBackend
    prior = ckpt.resume_point(args.load, args.ckpt_step, args.fresh_start)
    start_iter, prior_meta = prior if prior else (0, {})
    # Megatron-LM's consumed_train_samples: where the data resumes, whatever the global batch was before
    consumed = prior_meta.get("consumed_samples", start_iter * prior_meta.get("data", {}).get("global_batch_size", gbs))
    train_ds, valid_ds, tokenizer = build_datasets(args, gbs, consumed + (args.train_iters - start_iter) * gbs)
    vocab = padded_vocab(tokenizer.vocab_size, args)
    settings = model_settings(args, vocab)
    data = data_settings(args, gbs, tokenizer.model_path, tokenizer.tokenizer_type)
    if prior:  # every check before the model is built: a refused resume costs seconds
        directory = ckpt.iteration_dir(args.load, start_iter)
        ckpt.check_resumable(prior_meta, settings, directory, reshardable=Backend.reshardable,
                             tokenizer_vocab=tokenizer.vocab_size)
        where = f"from {directory}"
        check_data(prior_meta.get("data"), data, args.allow_changed_on_resume, where,
                   log=print if dist.get_rank() == 0 else (lambda *a: None))
        if not args.no_load_optim and "imported_from" not in prior_meta:
            ckpt.check_optimizer_resumable(prior_meta, args, settings, directory)
            check_schedule(prior_meta.get("args"), args, where)
    model, config = build_model(args, vocab)
    init_params_by_global_name(model, seed=args.seed, std=config.init_method_std, num_layers=args.num_layers)
    simreg = (SimRegConfig(weight=args.simreg_weight, temperature=args.simreg_temperature,
                           chunk_size=args.simreg_chunk_size, mode=args.simreg_mode,
                           representation=args.simreg_representation, scope=args.simreg_scope,
                           eod_id=tokenizer.eod if args.simreg_scope == "document" else None)
              if args.simreg_weight > 0 else None)
    jreg = JRegConfig(weight=args.jreg_weight, weighting=args.jreg_weighting) if args.jreg_weight > 0 else None
    if simreg or jreg:
        apply_to_megatron(simreg=simreg, jreg=jreg)
    else:
        undo_megatron_patch()

    backend = (Backend(args, model, config, num_micro) if args.deepspeed else Backend(args, model, config))

    if prior:
        ckpt.resume(args.load, start_iter, prior_meta, backend, settings, load_optim=not args.no_load_optim)
    meta = {**ckpt.run_meta(args, settings, tokenizer.model_path, tokenizer.tokenizer_type), "data": data}
    if "hf_vocab_size" in prior_meta:  # an imported model's HF vocabulary: export-hf gives back all its rows
        meta["hf_vocab_size"] = prior_meta["hf_vocab_size"]
    rank0 = dist.get_rank() == 0
    wandb = (dict(project=args.wandb_project, name=args.wandb_exp_name, config=vars(args),
                  dir=args.wandb_save_dir or (os.path.join(args.save, "wandb") if args.save else None))
             if args.wandb_project else None)
    writer = MetricsWriter(args.save, args.tensorboard_dir, args.train_iters, start_iter, enabled=rank0, wandb=wandb)
    batches = Batches(train_ds, gbs, args.micro_batch_size)
    valid_batches = Batches(valid_ds, gbs, args.micro_batch_size) if valid_ds is not None else None
    dp_group = ps.get_data_parallel_group()
    n_params = sum(_all_sum([sum(p.numel() for p in model.parameters())], ps.get_model_parallel_group()))
    tokens_per_iter = gbs * args.seq_length
    nan_grad_at = int(os.environ.get(NAN_GRAD_ENV, "0"))
    last = {}
    try:
        for it in range(start_iter, args.train_iters):
            full = batches.at(consumed)
            if simreg is not None:
                anchors, ntok = _all_sum([
                    int(count_step_anchors([mb["labels"] for mb in full], [mb["loss_mask"] for mb in full], simreg,
                                           tp=args.tensor_model_parallel_size, cp=args.context_parallel_size,
                                           sequence_parallel=args.sequence_parallel)),
                    sum(float(mb["loss_mask"].sum()) for mb in full)], dp_group)
                begin_step(num_anchors=int(anchors), num_tokens=int(ntok))
            lr = backend.lr  # the rate this iteration uses; the step advances the schedule
            t0 = time.perf_counter()
            with planted_nan_grad(it + 1 == nan_grad_at):
                sums, grad_norm, applied = backend.train_step(batches.local(full))
            elapsed = time.perf_counter() - t0
            lm = float(sums[0] / sums[1].clamp_min(1))
            reg = report_losses(pp_group=ps.get_pipeline_model_parallel_group(), dp_group=dp_group)
            if not (applied and math.isfinite(lm) and (grad_norm is None or math.isfinite(grad_norm))):
                raise TrainingStopped(_non_finite_message(args, it + 1, lm, grad_norm, applied))
            consumed += gbs
            record = {"iteration": it + 1, "consumed_tokens": consumed * args.seq_length, "lm_loss": lm,
                      "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tokens_per_iter / elapsed,
                      "tflops": tflops(n_params, args, tokens_per_iter, elapsed) / world,
                      "mem_gb": mem_gb()}
            if simreg is not None:
                record["simreg_loss"] = reg["simreg"]
            if jreg is not None:
                record["jreg_loss"] = reg["jreg"]
            if args.num_experts:
                record["moe_aux_loss"] = moe_aux_loss(num_micro)
            if valid_batches is not None and args.eval_interval and ((it + 1) % args.eval_interval == 0
                                                                    or it + 1 == args.train_iters):
                record["val_loss"], record["val_loss_se"], batch_losses = evaluate(backend, valid_batches,
                                                                                   args.eval_iters)
                if it + 1 == args.train_iters and rank0:  # compare pairs runs that evaluated the same batches
                    record["val_batches"] = {"losses": batch_losses,
                                             "sha256": valid_batches.fingerprint(args.eval_iters)}
            if (it + 1) % args.log_interval == 0 or "val_loss" in record or it + 1 == args.train_iters:
                writer.log(record)
            last = record
            exiting = (args.exit_interval and (it + 1) % args.exit_interval == 0) or signal_received()
            if args.save and ((args.save_interval and (it + 1) % args.save_interval == 0) or exiting):
                ckpt.save(args.save, it + 1, {**meta, "consumed_samples": consumed}, backend)
            if exiting:
                return last
        saved_by_interval = args.save_interval and args.train_iters % args.save_interval == 0
        if args.save and last and not saved_by_interval:
            ckpt.save(args.save, args.train_iters, {**meta, "consumed_samples": consumed}, backend)
    finally:
        writer.close()
    return last


def _non_finite_message(args, iteration: int, lm: float, grad_norm: float, applied: bool) -> str:
    """Why the run stopped, what is on disk, and commands that continue from it."""
    what = f"the LM loss is {lm:.4g} and the gradient norm {grad_norm} (not finite)"
    update = ("the update was not applied" if not applied else
              "the update was applied in memory but is never saved")
    if not args.save:
        return f"iteration {iteration}: {what}; stopping ({update}; --save was not set, so nothing is kept)"
    done = [i for i in ckpt.complete_iterations(args.save) if i < iteration]  # later ones: a --ckpt-step resume's
    if not done:
        return (f"iteration {iteration}: {what}; stopping ({update}). No checkpoint was saved before it; lower --lr "
                "or lengthen --lr-warmup-iters and start again")
    return (f"iteration {iteration}: {what}; stopping ({update}). The newest checkpoint, "
            f"{ckpt.iteration_dir(args.save, done[-1])}, was saved before it. Continue with a lower learning rate: "
            f"--load {args.save} --lr {args.lr / 10:g} --override-opt_param-scheduler; or step back to an earlier "
            f"checkpoint with --ckpt-step N (complete: {', '.join(map(str, done[-5:]))})")


def evaluate(backend, valid_batches: Batches, eval_iters: int):
    """``(loss, standard error, per-batch losses)`` over the first ``eval_iters`` global batches of the validation
    split (the same ones at every evaluation, and in every run with the same ``--seed`` and data). The loss is the
    token-weighted mean; its standard error is the spread of the batches' own means over ``sqrt(eval_iters)``
    (``None`` with one batch). Batches hold whole random documents' sequences, so they are close to independent
    draws; sequences within one batch are not, which is why the batch, not the token, is the unit."""
    sums = torch.zeros(2)
    means = []
    for i in range(eval_iters):
        step = backend.eval_step(valid_batches.local(valid_batches.full(i))).float().cpu()
        sums += step
        means.append(float(step[0] / step[1].clamp_min(1)))
    se = float(torch.tensor(means).std() / math.sqrt(len(means))) if len(means) > 1 else None
    return float(sums[0] / sums[1].clamp_min(1)), se, means
