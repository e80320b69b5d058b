"""SimReg and JREG in Megatron-LM's own training loop (``pretrain_gpt.py`` and scripts like it).

Run ``examples/pretrain_gpt_simreg.py`` in place of ``pretrain_gpt.py``, with the same flags plus
``--simreg-weight`` / ``--jreg-weight``. What :func:`install` changes in ``megatron.training``, nothing else:

* ``pretrain``: chains :func:`add_arguments` onto the script's own ``extra_args_provider``, and wraps its
  ``model_provider`` so that :func:`apply_from_args` patches GPTModel from ``get_args()`` before the first
  model chunk is built (settings Megatron-LM cannot train with are refused there, by name).
* ``training.train_step``, while a regularizer is on. Before the step, on the ranks that read data
  (tensor-parallel rank 0 of the first and last pipeline stages, as ``get_batch_on_this_tp_rank`` does),
  it looks ahead at the step's micro-batches without consuming them:

  - SimReg ``global_batch`` needs the global batch's anchor count before the first backward (see
    :mod:`.megatron.step`): counted there, summed over data-parallel ranks, broadcast over tensor-parallel ones.
  - Megatron-LM calls the model without ``loss_mask`` on middle pipeline stages (they read no data) and on the
    first stage's tensor-parallel ranks other than 0 (``get_batch_on_this_tp_rank`` broadcasts it within the
    last stage only), so JREG there would count padding and masked EOD tokens: the step's masks are broadcast
    from the first stage over the pipeline and tensor-parallel groups and handed to the patch
    (``begin_step(loss_masks=...)``), which uses them only where the model got no ``loss_mask``.

  After the step it adds ``simreg loss`` and ``jreg loss`` to the step's loss dict on the last stage, which
  ``training_log`` prints in its log line and writes to TensorBoard and wandb like ``lm loss``.

Megatron-LM is imported lazily: importing this module needs neither Megatron-LM nor a GPU.
"""

from __future__ import annotations

import argparse
import collections
import functools
import inspect
import itertools
import os
import sys
from typing import Callable, Optional, Tuple

import torch

from .config import JREG_METRICS, JREG_WEIGHTINGS, SIMREG_MODES, SIMREG_NORMALIZATIONS, SIMREG_REPRESENTATIONS
from .config import SIMREG_SCOPES, JRegConfig, SimRegConfig

MARKER = "_megatron_simreg_installed"
LOG_KEYS = {"simreg": "simreg loss", "jreg": "jreg loss"}  # loss-dict keys, styled like Megatron-LM's "lm loss"


# --------------------------------------------------------------------------------------------------- flags

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Our flags, as a Megatron-LM ``extra_args_provider`` (returns the parser)."""
    g = parser.add_argument_group("SimReg and JREG (megatron-simreg)")
    g.add_argument("--simreg-weight", type=float, default=0.0, help="SimReg's lambda; 0 disables SimReg")
    g.add_argument("--simreg-temperature", type=float, default=0.1)
    g.add_argument("--simreg-chunk-size", type=int, default=None,
                   help="anchors see only keys in the same window of this many positions (SimReg-Chunk)")
    g.add_argument("--simreg-mode", default="exact", choices=SIMREG_MODES)
    g.add_argument("--simreg-representation", default="post_norm", choices=SIMREG_REPRESENTATIONS)
    g.add_argument("--simreg-normalization", default="global_batch", choices=SIMREG_NORMALIZATIONS,
                   help="global_batch: the anchor-weighted mean over the global batch (exact); micro_batch: the "
                        "mean of per-micro-batch means, like the MoE aux loss")
    g.add_argument("--simreg-scope", default="sequence", choices=SIMREG_SCOPES,
                   help="which tokens may pair: any two of a training sequence, or (document) only two of the same "
                        "document of a packed sequence, documents ending after each EOD input token (the "
                        "tokenizer's eod)")
    g.add_argument("--jreg-weight", type=float, default=0.0, help="JREG's alpha; 0 disables JREG")
    g.add_argument("--jreg-weighting", default="final", choices=JREG_WEIGHTINGS)
    g.add_argument("--jreg-power", type=float, default=1.0, help="p of the layer_weighted weighting")
    g.add_argument("--jreg-metric", default="angular", choices=JREG_METRICS)
    g.add_argument("--reg-every-token-counts", action="store_true",
                   help="a training forward called without loss_mask counts every token for SimReg and JREG "
                        "(default: refused). Not needed with pretrain_gpt.py, which passes loss_mask")
    return parser


def extra_args_provider(chain: Optional[Callable] = None) -> Callable:
    """An ``extra_args_provider`` adding our flags after ``chain``'s (the script's own provider, or None)."""
    def provider(parser):
        if chain is not None:
            parser = chain(parser)
        return add_arguments(parser)

    return provider


def configs_from_args(args) -> Tuple[Optional[SimRegConfig], Optional[JRegConfig]]:
    """The ``(SimRegConfig, JRegConfig)`` the flags ask for (None where its weight is 0)."""
    try:
        simreg = (SimRegConfig(weight=args.simreg_weight, temperature=args.simreg_temperature,
                               chunk_size=args.simreg_chunk_size, mode=args.simreg_mode,
                               representation=args.simreg_representation, normalization=args.simreg_normalization,
                               scope=args.simreg_scope, eod_id=_eod_id() if args.simreg_scope == "document" else None)
                  if args.simreg_weight != 0 else None)
        jreg = (JRegConfig(weight=args.jreg_weight, weighting=args.jreg_weighting, power=args.jreg_power,
                           metric=args.jreg_metric) if args.jreg_weight != 0 else None)
    except AttributeError as e:
        raise RuntimeError("megatron-simreg: Megatron-LM's args lack our flags: pass "
                           "megatron_simreg.megatron_lm.extra_args_provider(...) to pretrain(), or run "
                           "examples/pretrain_gpt_simreg.py") from e
    except ValueError as e:  # the config's message names the field; say which flag sets it
        raise ValueError(f"megatron-simreg flags (--simreg-* / --jreg-*): {e}") from None
    return simreg, jreg


def _eod_id() -> int:
    """Megatron-LM's tokenizer's end-of-document id: the id its GPT dataset appends to every document."""
    from megatron.training import get_tokenizer

    return int(get_tokenizer().eod)


def check_supported(args) -> None:
    """Refuse, by name, Megatron-LM settings under which the regularizers cannot be trained exactly."""
    from .megatron.patch import refuse_cuda_graphs

    if args.virtual_pipeline_model_parallel_size is not None:
        raise NotImplementedError(
            "megatron-simreg with Megatron-LM does not support virtual pipeline stages "
            "(--num-layers-per-virtual-pipeline-stage / --num-virtual-stages-per-pipeline-rank): the step's "
            "micro-batches arrive through one iterator per model chunk, which the SimReg anchor count and the "
            "JREG loss masks are not read from yet. Drop the virtual stages, or disable SimReg and JREG "
            "(--simreg-weight 0 --jreg-weight 0).")
    if getattr(args, "use_legacy_models", False):
        raise NotImplementedError(
            "megatron-simreg patches megatron-core's GPTModel; --use-legacy-models builds Megatron-LM's legacy GPT "
            "model instead, which would train without SimReg and JREG. Drop --use-legacy-models, or disable SimReg "
            "and JREG.")
    if getattr(args, "hybrid_context_parallel", False):
        raise NotImplementedError(
            "megatron-simreg does not support --hybrid-context-parallel (packed THD sequences): SimReg would pair "
            "tokens across the documents packed into one row. Disable it, or disable SimReg and JREG.")
    refuse_cuda_graphs(args)  # Megatron-LM's args use the TransformerConfig's names


def apply_from_args(args) -> None:
    """Patch (or unpatch) GPTModel as the flags say. Idempotent: Megatron-LM builds one model chunk at a time."""
    from .megatron import apply_to_megatron, undo_megatron_patch

    simreg, jreg = configs_from_args(args)
    if simreg is None and jreg is None:
        undo_megatron_patch()
        return
    check_supported(args)
    apply_to_megatron(simreg, jreg, every_token_counts=args.reg_every_token_counts)


# ------------------------------------------------------------------------------------ finding Megatron-LM

def find_megatron_lm() -> str:
    """Put Megatron-LM (``MEGATRON_LM_PATH``, else ``sys.path``) where imports find it; returns ``pretrain_gpt.py``."""
    root = os.environ.get("MEGATRON_LM_PATH")
    if root:
        script = os.path.join(root, "pretrain_gpt.py")
        if not (os.path.isfile(script) and os.path.isdir(os.path.join(root, "megatron", "training"))):
            raise SystemExit(f"MEGATRON_LM_PATH={root} is not a Megatron-LM checkout: it needs pretrain_gpt.py and "
                             "megatron/training/. Point it at the repository root (the directory holding "
                             "pretrain_gpt.py).")
        if root not in sys.path:
            sys.path.insert(0, root)
        return script
    for entry in sys.path:
        script = os.path.join(entry or os.getcwd(), "pretrain_gpt.py")
        if os.path.isfile(script) and os.path.isdir(os.path.join(os.path.dirname(script), "megatron", "training")):
            return script
    raise SystemExit("Megatron-LM was not found: set MEGATRON_LM_PATH to your Megatron-LM checkout (the directory "
                     "holding pretrain_gpt.py), or put that directory on PYTHONPATH.")


# ---------------------------------------------------------------------------------- the training loop hooks

def install() -> None:
    """Wrap ``megatron.training``'s ``pretrain`` and ``train_step`` (idempotent; see the module docstring)."""
    import megatron.training
    import megatron.training.training as training

    if getattr(training, MARKER, False):
        return
    for name in ("pretrain", "train_step"):
        if not callable(getattr(training, name, None)):
            raise RuntimeError(f"megatron-simreg: megatron.training.training.{name} was not found in this "
                               "Megatron-LM; the adapter supports Megatron-LM core_v0.16.x (its tested version)")
    original = training.pretrain
    training.pretrain = _wrap_pretrain(original)
    if getattr(megatron.training, "pretrain", None) is original:  # what `from megatron.training import pretrain` gets
        megatron.training.pretrain = training.pretrain
    training.train_step = _wrap_train_step(training.train_step)
    setattr(training, MARKER, True)


def uninstall() -> None:
    """Restore what :func:`install` wrapped."""
    import megatron.training
    import megatron.training.training as training

    if not getattr(training, MARKER, False):
        return
    if megatron.training.pretrain is training.pretrain:
        megatron.training.pretrain = training.pretrain.__wrapped__
    training.pretrain = training.pretrain.__wrapped__
    training.train_step = training.train_step.__wrapped__
    delattr(training, MARKER)


def _signature_with(original, names):
    sig = inspect.signature(original)
    missing = [n for n in names if n not in sig.parameters]
    if missing:
        raise RuntimeError(f"megatron-simreg: {original.__module__}.{original.__name__} has no parameter(s) "
                           f"{missing} in this Megatron-LM; the adapter supports Megatron-LM core_v0.16.x")
    return sig


def _wrap_pretrain(original):
    sig = _signature_with(original, ("model_provider", "extra_args_provider"))

    def pretrain(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.arguments["extra_args_provider"] = extra_args_provider(bound.arguments.get("extra_args_provider"))
        bound.arguments["model_provider"] = _applying_first(bound.arguments["model_provider"])
        return original(*bound.args, **bound.kwargs)

    return functools.update_wrapper(pretrain, original)


def _applying_first(model_provider):
    def provider(*args, **kwargs):
        from megatron.training import get_args

        apply_from_args(get_args())
        return model_provider(*args, **kwargs)

    return functools.update_wrapper(provider, model_provider)  # Megatron-LM reads its signature


def _wrap_train_step(original):
    sig = _signature_with(original, ("data_iterator",))

    def train_step(*args, **kwargs):
        from .megatron.patch import active_configs

        simreg, jreg, every_token_counts = active_configs()
        if simreg is None and jreg is None:
            return original(*args, **kwargs)
        from .megatron import end_step, report_losses
        from megatron.core import parallel_state as ps

        _begin_step(sig.bind(*args, **kwargs).arguments["data_iterator"], simreg, jreg, every_token_counts)
        try:
            result = original(*args, **kwargs)
        finally:
            end_step()
        names = [n for n, cfg in (("simreg", simreg), ("jreg", jreg)) if cfg is not None]
        values = report_losses(names, pp_group=ps.get_pipeline_model_parallel_group(),
                               dp_group=ps.get_data_parallel_group())
        loss_dict = result[0]
        if loss_dict:  # the last stage's reduced losses: training_log logs every key
            device = getattr(next(iter(loss_dict.values())), "device", None)
            for name, value in values.items():
                loss_dict[LOG_KEYS[name]] = torch.tensor(value, dtype=torch.float, device=device)
        return result

    return functools.update_wrapper(train_step, original)


class _Lookahead:
    """An iterator whose next items can be read without consuming them."""

    def __init__(self, iterator):
        self._iterator = iterator
        self._buffer = collections.deque()

    def __iter__(self):
        return self

    def __next__(self):
        return self._buffer.popleft() if self._buffer else next(self._iterator)

    def peek(self, n: int) -> list:
        while len(self._buffer) < n:
            self._buffer.append(next(self._iterator))
        return list(itertools.islice(self._buffer, n))


def _peek(data_iterator, n: int) -> list:
    """The step's next ``n`` micro-batches, left in place for Megatron-LM's ``get_batch``.

    Megatron-LM wraps every training iterator in a ``RerunDataIterator``; the look-ahead goes under it, so its
    own saving and replaying of a step's micro-batches is untouched."""
    from megatron.core.rerun_state_machine import RerunDataIterator

    if not isinstance(data_iterator, RerunDataIterator):
        raise TypeError(f"megatron-simreg: train_step got a {type(data_iterator).__name__} as its data iterator; "
                        "Megatron-LM's train() passes a RerunDataIterator, which the adapter needs to look ahead "
                        "at the step's micro-batches")
    if not isinstance(data_iterator.iterable, _Lookahead):
        data_iterator.iterable = _Lookahead(data_iterator.iterable)
    return data_iterator.iterable.peek(n)


def _begin_step(data_iterator, simreg, jreg, every_token_counts: bool) -> None:
    """Give the patch the step's anchor and token counts and its loss masks (see the module docstring)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.training import get_args

    from .megatron import begin_step, count_step_anchors
    from .parallel.comm import comm_device

    args = get_args()
    m = get_num_microbatches()
    reads_data = data_iterator is not None and ps.get_tensor_model_parallel_rank() == 0
    batches = _peek(data_iterator, m) if reads_data else None
    device = comm_device()
    tp_group, tp_src = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_src_rank()
    tp = ps.get_tensor_model_parallel_world_size()

    pp = ps.get_pipeline_model_parallel_world_size()
    counts = None
    # SimReg runs on the last stage only; its DP and TP groups lie within the stage, so other stages skip the count
    last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
    if simreg is not None and simreg.normalization == "global_batch" and last_stage:
        counts = torch.zeros(2, dtype=torch.float64, device=device)  # [anchors, valid tokens]
        if batches and batches[0].get("labels") is not None:
            labels = [b["labels"] for b in batches]
            masks = [b["loss_mask"] for b in batches]
            counts[0] = float(count_step_anchors(labels, masks, simreg, tp=tp, cp=args.context_parallel_size,
                                                 sequence_parallel=args.sequence_parallel))
            counts[1] = float(sum(mask.sum() for mask in masks))
        dist.all_reduce(counts, group=ps.get_data_parallel_group())  # not over CP: its ranks read the same data
        if tp > 1:
            dist.broadcast(counts, src=tp_src, group=tp_group)

    masks = None
    # without pipeline stages every rank's model gets loss_mask from Megatron-LM itself: nothing to hand over
    if jreg is not None and not every_token_counts and pp > 1:
        shape = (m, args.micro_batch_size, args.seq_length)
        masks = (torch.stack([b["loss_mask"] for b in batches]).to(device, torch.uint8) if batches
                 else torch.zeros(shape, dtype=torch.uint8, device=device))
        if tuple(masks.shape) != shape:
            raise ValueError(f"megatron-simreg: the step's loss masks have shape {tuple(masks.shape)}, expected "
                             f"[micro-batches, --micro-batch-size, --seq-length] = {list(shape)}")
        dist.broadcast(masks, src=ps.get_pipeline_model_parallel_first_rank(),
                       group=ps.get_pipeline_model_parallel_group())
        if tp > 1:
            dist.broadcast(masks, src=tp_src, group=tp_group)
        masks = list(masks.unbind(0))
    begin_step(num_anchors=counts[0] if counts is not None else None,
               num_tokens=counts[1] if counts is not None else None, loss_masks=masks)
