"""Run Megatron-LM's own training scripts (``pretrain_gpt.py``) on CPU with gloo: test-only shims.

Usage (one process per rank, gloo)::

    PYTHONPATH=/path/to/Megatron-LM:/work/main \\
      python -m torch.distributed.run --nproc-per-node N --master-port P \\
      tests/megatron_lm_cpu.py SCRIPT.py [Megatron-LM args...]

``SCRIPT.py`` is Megatron-LM's ``pretrain_gpt.py`` or a launcher importing its pieces
(``from pretrain_gpt import forward_step, ...``).  This module applies the CPU shims first,
then runs SCRIPT as ``__main__`` (``runpy.run_path``) with ``sys.argv = [SCRIPT, args...]``
and SCRIPT's directory first on ``sys.path``, as ``python SCRIPT.py`` would.

What is patched: first ``megatron_simreg.megatron.cpu_compat.apply_cpu_adaptations()`` (megatron-core
on CPU/gloo, see its docstring), then, for Megatron-LM's training loop, names inside the modules and
functions listed here (the real ``torch`` module is never modified; the ``*.cuda`` method swaps of 2-4
last only for one call; the numbers match the comments in :func:`apply_megatron_lm_cpu_shims`):

1. ``torch`` inside ``_TRAINING_MODULES`` (megatron.training.{initialize, training, utils, checkpointing,
   inprocess_restart}, megatron.core.{timers, rerun_state_machine, multi_token_prediction,
   moe.token_dispatcher, dist_checkpointing.strategies.fully_parallel}) -> a proxy over cpu_compat's
   CPU torch (``device="cuda"`` factories on CPU, ``torch.cuda.current_device()`` = cpu, synchronize
   no-op, CUDA RNG = CPU RNG) whose ``torch.cuda`` also has ``set_device`` (no-op), ``device_count()``
   = 1 (initialize.py builds the model-parallel groups and seeds the RNG tracker only if > 0),
   ``memory_stats()`` (all 0), ``Stream`` / ``current_stream`` / ``stream`` (one no-op stream), and, in
   ``megatron.training.initialize`` only, ``is_available()`` = True (``initialize_megatron`` asserts it).
2. ``torch.nn.Module.cuda`` -> identity while ``training.get_model`` runs.
3. ``torch.Tensor.cuda`` -> identity while ``utils.get_batch_on_this_tp_rank`` runs (batch "to the GPU").
4. ``torch.Tensor.cuda`` -> identity while ``training.evaluate`` runs (its loss accumulators).
5. ``WrappedTorchNorm`` (asserts not sequence_parallel) -> cpu_compat's ``CPUTorchNorm`` in the local specs
   (``models.backends.WrappedTorchNorm`` / ``LNImpl``, ``gpt_layer_specs.LNImpl``).
6. ``token_dispatcher.maybe_move_tensor_to_cpu``: numpy split sizes for gloo's all_to_all_single.
7. ``datasets.utils.compile_helpers``: uses the prebuilt ``helpers_cpp`` (the wheel has no Makefile).
8. ``initialize.fused_kernels`` -> no-op ``load`` (legacy CUDA kernels, nvcc).
9. ``get_device_arch_version`` (training.utils / training.arguments) -> 0; ``main()`` sets
   ``CUDA_DEVICE_MAX_CONNECTIONS=1`` (default only), which validate_args then asserts for TP/CP > 1.
10. ``initialize._warmup_jit_function`` -> no-op (its random draws would make the initial weights
    depend on the TP layout on CPU; ~2.5 s of torch.compile).
11. ``checkpointing.generate_state_dict``: a fresh DistributedOptimizer gets its (torch AdamW) state
    before a load, plus ``megatron_simreg.megatron.compat.keep_torch_adam_step`` /
    ``load_dp_reshardable_without_grad``.

Every patch raises ``RuntimeError`` naming the symbol if its target no longer exists, and applying
twice is a no-op.  Refuses to run when CUDA is available (run Megatron-LM unmodified there).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import os
import runpy
import sys
from typing import Any, Callable, Dict

import torch

_MARKER = "_megatron_lm_cpu_applied"
_WRAPPED = "__megatron_lm_cpu_wrapped__"

# Modules reached by pretrain()/pretrain_gpt.py whose global ``torch`` gets the CPU proxy, with why.
_TRAINING_MODULES = {
    # set_device / device_count gate model-parallel init and the RNG tracker; torch.cuda.is_available assert;
    # the MoE aux-loss scale is made on current_device()
    "megatron.training.initialize": {"is_available": lambda: True},
    # timestamps/flags/loss accumulators on device='cuda', DDP set-up stream, memory reports
    "megatron.training.training": {},
    # get_batch_on_this_tp_rank broadcast buffers on current_device(); reduce_max_stat / report_memory
    "megatron.training.utils": {},
    # iteration all-reduce on 'cuda', cuda RNG state save/restore, empty_cache
    "megatron.training.checkpointing": {},
    # maybe_force_nccl_backend_init (torch.cuda.synchronize), only with --inprocess-restart
    "megatron.training.inprocess_restart": {},
    # timers: torch.cuda.synchronize() in start/stop, all-gather buffer on current_device()
    "megatron.core.timers": {},
    # the rerun state machine's validation reductions on device='cuda' / current_device()
    "megatron.core.rerun_state_machine": {},
    # MTP: loss-tracker buffers on current_device()
    "megatron.core.transformer.multi_token_prediction": {},
    # MoE alltoall dispatcher: a class-level torch.cuda.Stream() for the D2H copy of the split sizes, synchronised via
    # record_event().synchronize() (cpu_compat covers this module's device="cuda" tensors, not the streams)
    "megatron.core.transformer.moe.token_dispatcher": {},
    # fully-parallel load/save: torch.cuda.synchronize()
    "megatron.core.dist_checkpointing.strategies.fully_parallel": {},
}


class _NullStream:
    """CPU stand-in for ``torch.cuda.Stream`` / ``Event`` (everything already runs in order on CPU).

    One instance serves as every stream, so ``current_stream() != side_stream`` is False (no side stream)."""

    def wait_stream(self, other: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self, event: Any = None) -> "_NullStream":
        return self

    def wait_event(self, event: Any) -> None:
        return None

    def query(self) -> bool:
        return True


_NULL_STREAM = _NullStream()


class _TrainingCuda:
    """``torch.cuda`` inside the training modules: cpu_compat's CPU cuda shim plus the calls the loop makes."""

    def __init__(self, base_cuda: Any, extra: Dict[str, Callable]) -> None:
        self._base = base_cuda
        for name, fn in extra.items():
            setattr(self, name, fn)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    @staticmethod
    def set_device(device: Any) -> None:  # initialize._initialize_distributed: no device to select on CPU
        return None

    @staticmethod
    def device_count() -> int:  # > 0 or initialize skips initialize_model_parallel and the RNG tracker seeding
        return 1

    @staticmethod
    def memory_stats(device: Any = None) -> Dict[str, int]:  # --log-memory-to-tensorboard indexes its keys
        return collections.defaultdict(int)  # no CUDA caching allocator: every statistic is 0, as memory_allocated()

    @staticmethod
    def Stream(*args: Any, **kwargs: Any) -> _NullStream:  # DDP set-up / alltoall dispatcher D2H side streams
        return _NULL_STREAM

    @staticmethod
    def current_stream(*args: Any, **kwargs: Any) -> _NullStream:
        return _NULL_STREAM

    @staticmethod
    def stream(stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def __repr__(self) -> str:  # pragma: no cover
        return "<megatron_lm_cpu shim for torch.cuda>"


class _TrainingTorch:
    """``torch`` inside the training modules: cpu_compat's CPU torch shim with a :class:`_TrainingCuda`."""

    def __init__(self, base_torch: Any, extra_cuda: Dict[str, Callable]) -> None:
        self._base = base_torch
        self.cuda = _TrainingCuda(base_torch.cuda, extra_cuda)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    def __repr__(self) -> str:  # pragma: no cover
        return "<megatron_lm_cpu shim for torch>"


def _moved(what: str) -> RuntimeError:
    return RuntimeError(
        f"tests/megatron_lm_cpu.py: {what} no longer exists in this Megatron version; the CPU shim that "
        f"patches it must be updated"
    )


def _get(module_name: str, attr: str) -> Any:
    try:
        mod = importlib.import_module(module_name)
    except ImportError as exc:
        raise _moved(f"module {module_name}") from exc
    if not hasattr(mod, attr):
        raise _moved(f"{module_name}.{attr}")
    return mod, getattr(mod, attr)


def _with_method_identity(owner: type, method: str, fn: Callable) -> Callable:
    """``fn`` run with ``owner.<method>`` (``Tensor.cuda`` / ``Module.cuda``) replaced by identity for the call."""
    if getattr(fn, _WRAPPED, False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        outer = getattr(owner, method)
        setattr(owner, method, lambda self, *a, **k: self)
        try:
            return fn(*args, **kwargs)
        finally:
            setattr(owner, method, outer)

    setattr(wrapper, _WRAPPED, True)
    return wrapper


def _prebuilt_or(compile_helpers: Callable) -> Callable:
    """``compile_helpers`` that does nothing when ``megatron.core.datasets.helpers_cpp`` already imports."""

    @functools.wraps(compile_helpers)
    def wrapper() -> None:
        try:
            importlib.import_module("megatron.core.datasets.helpers_cpp")
        except ImportError:
            compile_helpers()

    setattr(wrapper, _WRAPPED, True)
    return wrapper


class _NoFusedKernels:
    """Stand-in for ``megatron.legacy.fused_kernels`` in initialize.py (CUDA-only kernels)."""

    @staticmethod
    def load(args: Any) -> None:
        return None


def _no_device_arch() -> int:
    """CPU stand-in for ``megatron.training.utils.get_device_arch_version`` (no CUDA compute capability)."""
    return 0


def _skip_jit_warmup() -> None:
    """CPU stand-in for ``megatron.training.initialize._warmup_jit_function`` (shim 10)."""
    return None


setattr(_skip_jit_warmup, _WRAPPED, True)


def _host_copy_or(maybe_move_tensor_to_cpu: Callable) -> Callable:
    """``maybe_move_tensor_to_cpu`` that also returns numpy for an (already host) CPU tensor when ``as_numpy``."""

    @functools.wraps(maybe_move_tensor_to_cpu)
    def wrapper(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return maybe_move_tensor_to_cpu(tensor, as_numpy=as_numpy, record_stream=record_stream)

    setattr(wrapper, _WRAPPED, True)
    return wrapper


def _with_optimizer_state_for_load(generate_state_dict: Callable) -> Callable:
    """``generate_state_dict`` that first gives a fresh DistributedOptimizer (torch AdamW) its state when loading."""

    @functools.wraps(generate_state_dict)
    def wrapper(args: Any, model: Any, optimizer: Any, *rest: Any, **kwargs: Any) -> Any:
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        if optimizer is not None and (kwargs.get("optim_sd_kwargs") or {}).get("is_loading"):
            for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
                if isinstance(opt, DistributedOptimizer) and opt.optimizer is not None and not opt.optimizer.state:
                    opt._init_optimizer_states_with_dummy_values()
        return generate_state_dict(args, model, optimizer, *rest, **kwargs)

    setattr(wrapper, _WRAPPED, True)
    return wrapper


def _patch_function(module_name: str, attr: str, owner: type, method: str) -> None:
    mod, fn = _get(module_name, attr)
    setattr(mod, attr, _with_method_identity(owner, method, fn))


def apply_megatron_lm_cpu_shims() -> None:
    """Apply megatron-core's CPU adaptations and the Megatron-LM training-loop shims (idempotent)."""
    if torch.cuda.is_available():
        raise RuntimeError("tests/megatron_lm_cpu.py is for CPU-only machines; run Megatron-LM unmodified on GPU")
    from megatron_simreg.megatron import cpu_compat

    cpu_compat.apply_cpu_adaptations()
    import megatron.core

    if getattr(megatron.core, _MARKER, False):
        return
    base = getattr(cpu_compat, "_TORCH_SHIM", None)
    if base is None:
        raise _moved("megatron_simreg.megatron.cpu_compat._TORCH_SHIM")

    # 1. module-scoped torch proxy (see _TRAINING_MODULES for why each module needs it)
    for mod_name, extra in _TRAINING_MODULES.items():
        mod, current = _get(mod_name, "torch")
        if current is torch or current is base:
            mod.torch = _TrainingTorch(base, extra)
        elif not isinstance(current, _TrainingTorch):
            raise RuntimeError(f"{mod_name}.torch is neither torch nor a CPU shim: {current!r}")

    # 2. get_model: model_module.cuda(torch.cuda.current_device()) on every chunk
    _patch_function("megatron.training.training", "get_model", torch.nn.Module, "cuda")
    # 3. the batch (tokens, labels, loss_mask, ...) is moved with Tensor.cuda(non_blocking=True)
    _patch_function("megatron.training.utils", "get_batch_on_this_tp_rank", torch.Tensor, "cuda")
    # 4. evaluate() makes its loss accumulators with torch.tensor(...).cuda()
    _patch_function("megatron.training.training", "evaluate", torch.Tensor, "cuda")

    # 5. the local specs' torch norm: WrappedTorchNorm asserts not sequence_parallel; cpu_compat's CPUTorchNorm is the
    #    same torch norm with SP support (LocalSpecProvider.layer_norm re-reads backends.WrappedTorchNorm on every
    #    call; gpt_layer_specs.LNImpl is the MoE decoder block's final norm)
    _, wrapped_norm = _get("megatron.core.transformer.torch_norm", "WrappedTorchNorm")
    for mod_name, attr in (
        ("megatron.core.models.backends", "WrappedTorchNorm"),
        ("megatron.core.models.backends", "LNImpl"),
        ("megatron.core.models.gpt.gpt_layer_specs", "LNImpl"),
    ):
        mod, value = _get(mod_name, attr)
        if value is wrapped_norm:  # (LNImpl is apex's FusedLayerNorm where apex is installed: left alone)
            setattr(mod, attr, cpu_compat.CPUTorchNorm)
    # 6. MoE alltoall dispatcher: split sizes go to all_to_all_single as maybe_move_tensor_to_cpu(..., as_numpy=True);
    #    that converts only CUDA tensors, and gloo's all_to_all_single refuses the CPU tensor it returns on CPU
    disp, move = _get("megatron.core.transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu")
    if not getattr(move, _WRAPPED, False):
        disp.maybe_move_tensor_to_cpu = _host_copy_or(move)

    # 7. initialize._compile_dependencies runs `make` in megatron/core/datasets (no Makefile in the wheel): use the
    #    prebuilt helpers_cpp extension when it imports, else fall through to the original (which compiles)
    dutils, compile_helpers = _get("megatron.core.datasets.utils", "compile_helpers")
    if not getattr(compile_helpers, _WRAPPED, False):
        dutils.compile_helpers = _prebuilt_or(compile_helpers)
    # 8. ... and then builds the legacy CUDA fused kernels (nvcc, CUDA_HOME): nothing to load on CPU
    init_mod, fused_kernels = _get("megatron.training.initialize", "fused_kernels")
    if not isinstance(fused_kernels, _NoFusedKernels):
        if not hasattr(fused_kernels, "load"):
            raise _moved("megatron.training.initialize.fused_kernels.load")
        init_mod.fused_kernels = _NoFusedKernels()

    # 9. validate_args asks get_device_arch_version() (torch.cuda.get_device_properties) when TP/CP > 1: no arch
    #    (0 = "before Blackwell": Megatron then wants CUDA_DEVICE_MAX_CONNECTIONS=1, which main() sets by default)
    for mod_name in ("megatron.training.utils", "megatron.training.arguments"):
        mod, _ = _get(mod_name, "get_device_arch_version")
        mod.get_device_arch_version = _no_device_arch

    # 10. set_jit_fusion_options -> _warmup_jit_function: torch.compile warm-up of the fused bias-gelu/swiglu and
    #     bias-dropout-add kernels (~2.5 s of inductor on CPU) whose torch.rand(device="cuda") draws, on CPU, come
    #     from the CPU generator (= the shimmed CUDA one) with TP/SP-dependent shapes: --use-cpu-initialization weights
    #     would then differ between TP layouts (on GPU they come from the CUDA generator and the CPU one is untouched)
    init_mod, warmup = _get("megatron.training.initialize", "_warmup_jit_function")
    if not getattr(warmup, _WRAPPED, False):
        init_mod._warmup_jit_function = _skip_jit_warmup

    # 11. reloading the DistributedOptimizer into torch's AdamW (no TE/apex: always so on CPU). Its state_dict()
    #     asserts on each param's "step", which AdamW makes only at its first step: before a torch_dist load
    #     generate_state_dict(optim_sd_kwargs={is_loading: True}) gets megatron-core's own remedy (one step on zero
    #     grads, _init_optimizer_states_with_dummy_values, used before its FSDP loads; the load overwrites it all),
    #     plus the project's fixes for the step/in-place bugs of that reload path (megatron_simreg.megatron.compat)
    ckpt_mod, generate_state_dict = _get("megatron.training.checkpointing", "generate_state_dict")
    _, DistributedOptimizer = _get("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer")
    if not hasattr(DistributedOptimizer, "_init_optimizer_states_with_dummy_values"):
        raise _moved("DistributedOptimizer._init_optimizer_states_with_dummy_values")
    if not getattr(generate_state_dict, _WRAPPED, False):
        ckpt_mod.generate_state_dict = _with_optimizer_state_for_load(generate_state_dict)
    from megatron_simreg.megatron import compat

    compat.keep_torch_adam_step()
    compat.load_dp_reshardable_without_grad()

    setattr(megatron.core, _MARKER, True)


def main(argv: list) -> None:
    if not argv:
        raise SystemExit("usage: megatron_lm_cpu.py SCRIPT.py [Megatron-LM args...]")
    script = os.path.abspath(argv[0])
    here = os.path.dirname(os.path.abspath(__file__))
    # `python SCRIPT.py` puts SCRIPT's directory first on sys.path (instead of this file's)
    if sys.path and os.path.abspath(sys.path[0] or os.getcwd()) == here:
        sys.path[0] = os.path.dirname(script)
    else:
        sys.path.insert(0, os.path.dirname(script))
    # validate_args asserts this for TP/CP > 1 before Blackwell (see shim 9); it means nothing on CPU
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    apply_megatron_lm_cpu_shims()
    sys.argv = [script] + list(argv[1:])
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
