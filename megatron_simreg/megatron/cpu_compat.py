"""CPU (gloo) adaptations for Megatron-core 0.16.x, for tests and small simulations only.

Megatron-core assumes CUDA in a number of places that are reached even by the
"local" (no apex / no Transformer-Engine) layer spec.  ``apply_cpu_adaptations()``
patches exactly those places so that ``GPTModel`` built from
``get_gpt_layer_local_spec`` (or the SP-aware :func:`get_cpu_gpt_layer_spec`)
can run forward/backward on CPU under ``torch.distributed`` with the gloo
backend, including tensor parallel (+ sequence parallel), pipeline parallel
(``get_forward_backward_func``) and MoE (SequentialMLP experts).

It refuses to run when ``torch.cuda.is_available()`` (RuntimeError, nothing is
patched): on a GPU machine Megatron must run unmodified.  It is idempotent
(marker attribute ``megatron.core._simreg_cpu_compat_applied``) and fully
reversible with ``undo_cpu_adaptations()`` (every original object is recorded
and restored).

Adaptations (and why each is needed)
------------------------------------
1. Module-scoped ``torch`` device shim (``_TorchCpuShim``).  The global name
   ``torch`` inside a fixed list of Megatron modules (``_SHIMMED_MODULES``) is
   replaced by a proxy that forwards every attribute to the real ``torch``
   except:

   * ``torch.cuda.current_device()`` -> ``torch.device("cpu")``.  Used as the
     allocation device by ``GlobalMemoryBuffer`` (core/utils.py: SP all-gather
     buffers of the TP linears and attention), ``tensor_parallel/mappings.py``
     (SP gather / reduce-scatter outputs), ``tensor_parallel/layers.py``
     (SP dgrad reduce-scatter buffer), rotary embeddings
     (``inv_freq`` is moved "to the GPU" on first forward), the MoE router
     (weights moved "to the GPU" on first forward), pipeline p2p shape
     tensors, etc.  On a CPU-only torch build these calls raise
     "Torch not compiled with CUDA enabled".
   * ``torch.cuda.synchronize()`` -> no-op.  Called by
     ``pipeline_parallel/p2p_communication.py`` after ``batch_isend_irecv``
     and by ``parallel_state`` / dist-checkpointing; gloo ops are already
     complete once ``wait()`` returns, so nothing needs synchronising.
   * ``torch.cuda.manual_seed / manual_seed_all / get_rng_state /
     set_rng_state`` -> the CPU generator equivalents.  Used by
     ``CudaRNGStatesTracker.add`` and ``model_parallel_cuda_manual_seed``
     (see 2).  Consequence: on CPU the "device" default generator *is* the
     CPU generator, so ``model_parallel_cuda_manual_seed(seed)`` also reseeds
     torch's CPU generator with ``seed`` (on GPU it would not).
   * tensor factories (``zeros, empty, ones, full, tensor, arange, rand,
     randn, randint, *_like``) map an explicit ``device="cuda"`` (or a cuda
     ``torch.device``) to CPU.  ``pipeline_parallel/schedules.py`` creates
     ``total_num_tokens = torch.zeros([], device="cuda")`` in every schedule,
     ``transformer/utils.get_default_causal_mask`` (used by the local
     ``DotProductAttention`` softmax whenever no explicit mask is passed)
     builds its mask with ``device="cuda"``,
     ``moe_utils.save_to_aux_losses_tracker`` and
     ``tensor_parallel/data.broadcast_data`` too.

   Only these modules see the proxy; the real ``torch`` module, ``torch.cuda``
   and all user code are untouched.  (Checked: with ``bias_dropout_fusion`` /
   ``bias_activation_fusion`` on, Megatron's ``jit_fuser`` = ``torch.compile``
   helpers compile and run on CPU with the shim in place and give the same
   numbers, but the first step costs ~10-20 s of inductor compilation on a
   small CPU, so tests switch the fusions off.)

2. CPU RNG for ``tensor_parallel.random``.  ``_get_cuda_rng_state`` /
   ``_set_cuda_rng_state`` are replaced by CPU-generator versions.  The
   originals call ``torch.cuda.random.get_rng_state`` (raises without CUDA)
   and ``torch.cuda._lazy_call`` (on a CPU build the callback is queued and
   *never executed*, so the tracker would silently not switch states).
   ``CudaRNGStatesTracker.fork`` is replaced by an identical version without
   the "CPU RNG state changed within GPU RNG context" warning, which is
   meaningless (and spurious for e.g. dropout) when device RNG == CPU RNG.

3. ``moe_utils.te_general_gemm = None``.  ``moe_utils`` imports
   ``te_general_gemm`` (and the fused_* helpers) only inside a
   ``try: import transformer_engine`` block, but
   ``RouterGatingLinearFunction.forward/backward`` test
   ``te_general_gemm is not None`` unconditionally, which raises
   ``NameError: name 'te_general_gemm' is not defined`` on the first MoE
   router forward when TE is absent.  Defining it as ``None`` selects the
   existing ``torch.mm`` fallback (the other fused_* names are guarded by
   ``HAVE_TE`` and need nothing).

4. Sequence-parallel-capable torch norm (``CPUTorchNorm``).  Without apex/TE
   Megatron falls back to ``WrappedTorchNorm``, which asserts
   ``not config.sequence_parallel``.  ``CPUTorchNorm`` builds the same
   ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` but allows SP and marks its
   parameters ``sequence_parallel = config.sequence_parallel``.  With SP each
   TP rank normalises only its sequence shard, so the norm weight/bias grads
   are partial sums: the caller MUST all-reduce (SUM) the grads of every
   parameter flagged ``sequence_parallel`` across the TP group (the MoE
   router weight is flagged by Megatron itself) — exactly what
   ``megatron.core.distributed.finalize_model_grads`` does
   (``_allreduce_non_tensor_model_parallel_grads``) for DDP-wrapped models;
   for unwrapped models use :func:`allreduce_sequence_parallel_grads`.
   ``apply_cpu_adaptations`` substitutes it for ``WrappedTorchNorm`` as
   ``transformer_block.LayerNormImpl`` (the final layernorm of
   ``GPTModel``/``TransformerBlock`` built from a *layer* spec) and
   :func:`get_cpu_gpt_layer_spec` puts it into the layer spec (the local
   spec's ``LocalSpecProvider.layer_norm(rms_norm=True)`` hard-resets its
   choice to ``WrappedTorchNorm``, so it cannot be patched globally there).
   For non-SP runs it is numerically identical to ``WrappedTorchNorm``.

5. ``LanguageModule.setup_embeddings_and_output_layer`` runs with
   ``torch.Tensor.cuda`` temporarily replaced by identity.  With PP>1 and
   tied embeddings it does ``weight.data = weight.data.cuda()`` before the
   first/last-stage all-reduce; the patch is only active for the duration of
   that call.

6. ``optimizer.clip_grads.clip_grad_by_total_norm_fp32`` (also imported by
   ``optimizer.optimizer``) asserts ``param.grad.type() ==
   'torch.cuda.FloatTensor'``; it is replaced by the same scaling without the
   assertion. The Megatron optimizer modules (``optimizer``,
   ``clip_grads``, ``distrib_optimizer``) are also in the device shim (1):
   ``found_inf``, the bf16 unit loss scale ``_scale_one``, the grad-norm
   all-reduce buffer and the distributed optimizer's state gather/scatter
   buffers are made with ``device="cuda"`` / ``torch.cuda.current_device()``.
   ``clip_grads.get_grad_norm_fp32`` (also imported by ``optimizer.optimizer``)
   is replaced, for the L2 norm, by :func:`_cpu_get_grad_norm_fp64`, which
   accumulates the squares in float64 and all-reduces that float64 sum (the
   result stays the Python float Megatron returns). Without TE/apex megatron
   falls back to ``utils.local_multi_tensor_l2_norm``: one fp32 ``torch.norm``
   per tensor, the norm of those norms, then that value squared and summed
   over ranks in fp32. The result depends on how the tensors are cut: the
   distributed optimizer shards the (embedding) buffer differently from one
   process, so the same gradient gets a norm (and a clip factor) differing by
   ~1e-5 relative, and in bf16 the rounding flips this starts grow over the
   steps. In float64 the cut no longer shows at fp32 resolution, so the
   layout tests can compare ``grad_norm`` (and, with clipping on, the losses)
   tightly. Test/CPU-only like every adaptation here: on GPU megatron's own
   fused fp32 kernel runs unmodified.

7. CUDA tensor-type names in the optimizers' constructors.
   ``Float16OptimizerWithFloat16Params.__init__`` (optimizer.py) and
   ``DistributedOptimizer.__init__`` /
   ``_build_model_and_main_param_groups`` (distrib_optimizer.py) sort the
   params by ``param.type() in ['torch.cuda.HalfTensor',
   'torch.cuda.BFloat16Tensor']`` (-> fp32 main copy) or ``==
   'torch.cuda.FloatTensor'`` and raise ``TypeError`` for anything else, so
   every CPU param (``torch.FloatTensor`` / ``torch.BFloat16Tensor``) is
   refused.  Both ``__init__`` run with ``torch.Tensor.type`` temporarily
   replaced by a version that, called without arguments on a CPU tensor,
   names its CUDA twin (``torch.BFloat16Tensor`` ->
   ``torch.cuda.BFloat16Tensor``); the original is restored when the
   constructor returns.  These are the only ``.type()`` checks in
   ``optimizer/`` and ``distributed/`` besides the clip-grads one (6).  With
   1, 6 and 7, ``get_megatron_optimizer`` runs on CPU with ``bf16=True``
   (``Float16OptimizerWithFloat16Params``: bf16 params, fp32 main params in
   torch's AdamW) and with ``use_distributed_optimizer=True``
   (``DistributedOptimizer``, fp32 or bf16).

   Gloo collectives: none is missing for the distributed optimizer with this
   torch (2.13).  Its grad/param buffers use ``reduce_scatter_tensor`` and
   ``all_gather_into_tensor`` (``dist_reduce_scatter_func`` /
   ``dist_all_gather_func`` in param_and_grad_buffer.py) inside
   ``torch.distributed._coalescing_manager``; gloo runs all three, in fp32 and
   bf16, so no fallback is installed.  Not exercised on CPU:
   ``overlap_grad_reduce`` / ``overlap_param_gather`` (async handles),
   ``num_distributed_optimizer_instances > 1`` (CUDA streams),
   ``reduce_scatter_with_fp32_accumulation``, fp16 (``grad_scaler.py`` makes
   its scale tensors on "cuda" and is not shimmed).

8. dist-checkpointing's save path: see :func:`_adapt_dist_checkpointing`.

Not adapted: cudagraphs, TE / apex paths,
``moe_grouped_gemm`` (needs the grouped_gemm CUDA package), the all-to-all /
flex MoE dispatchers (only ``allgather`` is exercised), inference paths.

Model configuration notes (not patches): use ``use_cpu_initialization=True``
(weights are built as full master weights and split, so they are identical
across TP layouts), and switch off CUDA-only fusions
(``gradient_accumulation_fusion``, ``bias_dropout_fusion``,
``bias_activation_fusion``, ``masked_softmax_fusion``, ``apply_rope_fusion``,
``persist_layer_norm``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Any, List, Optional, Tuple

import torch

__all__ = [
    "apply_cpu_adaptations",
    "undo_cpu_adaptations",
    "cpu_adaptations_applied",
    "CPUTorchNorm",
    "get_cpu_gpt_layer_spec",
    "get_cpu_gpt_block_spec",
    "allreduce_sequence_parallel_grads",
]

_MARKER = "_simreg_cpu_compat_applied"

# Megatron modules whose global ``torch`` is replaced by the CPU shim.
_SHIMMED_MODULES = (
    "megatron.core.utils",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.module",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    # the (non-distributed) Megatron optimizer: found_inf / overflow buffers
    # and the grad-norm all-reduce are created on "cuda"
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    # the distributed optimizer: its state gather/scatter buffers (checkpointing) are made on "cuda"
    "megatron.core.optimizer.distrib_optimizer",
)

# (object, attribute name, original value or _MISSING) recorded by _set_attr.
_MISSING = object()
_UNDO: List[Tuple[Any, str, Any]] = []


# ----------------------------------------------------------------------------
# 1. device shim
# ----------------------------------------------------------------------------
def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _cpu_factory(fn):
    def wrapper(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    wrapper.__name__ = getattr(fn, "__name__", "factory")
    wrapper.__wrapped__ = fn
    return wrapper


class _CudaCpuShim:
    """Stand-in for ``torch.cuda`` inside the shimmed Megatron modules."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return "<megatron_simreg cpu shim for torch.cuda>"


_FACTORIES = (
    "zeros", "empty", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
    "zeros_like", "empty_like", "ones_like", "full_like",
)


class _TorchCpuShim:
    """Stand-in for the ``torch`` module inside the shimmed Megatron modules."""

    def __init__(self) -> None:
        self.cuda = _CudaCpuShim()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return "<megatron_simreg cpu shim for torch>"


_TORCH_SHIM = _TorchCpuShim()


# ----------------------------------------------------------------------------
# 2. CPU RNG for tensor_parallel.random
# ----------------------------------------------------------------------------
def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    if graph_safe:
        raise RuntimeError("cudagraph-safe RNG tracking is not supported on CPU")
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
    if graph_safe:
        raise RuntimeError("cudagraph-safe RNG tracking is not supported on CPU")
    torch.set_rng_state(new_state)


def _make_cpu_fork(random_mod):
    default_name = random_mod._MODEL_PARALLEL_RNG_TRACKER_NAME

    @contextlib.contextmanager
    def fork(self, name=default_name):
        """CPU version of ``CudaRNGStatesTracker.fork`` (no CPU-RNG-changed warning)."""
        if name not in self.states_:
            raise Exception('cuda rng state {} is not added'.format(name))
        orig_state = _cpu_get_rng_state()
        orig_state_name = self._current_state_name
        if orig_state_name != "default-rng":
            self.states_[orig_state_name] = orig_state
        _cpu_set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(
                    f'current state name {self._current_state_name} is not the same as the '
                    f'desired state name {name}.'
                )
            self.states_[name] = _cpu_get_rng_state()
            if orig_state_name != "default-rng":
                orig_state = self.states_[orig_state_name]
            _cpu_set_rng_state(orig_state)
            self._current_state_name = orig_state_name

    return fork


# ----------------------------------------------------------------------------
# 4. sequence-parallel-capable torch norm
# ----------------------------------------------------------------------------
class CPUTorchNorm:
    """``WrappedTorchNorm`` replacement that supports sequence parallelism.

    Returns a ``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm`` (chosen by
    ``config.normalization``) whose parameters carry
    ``sequence_parallel = config.sequence_parallel``.  With SP, all-reduce the
    grads of flagged params across the TP group (see module docstring).
    """

    def __new__(
        cls,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: Optional[str] = None,
    ):
        assert not config.layernorm_zero_centered_gamma, "zero_centered_gamma not supported"
        assert not config.persist_layer_norm, "persist_layer_norm not supported by torch norms"
        assert not config.memory_efficient_layer_norm, "memory_efficient_layer_norm unsupported"
        kind = config.normalization
        if kind == "LayerNorm":
            norm = torch.nn.LayerNorm(normalized_shape=hidden_size, eps=eps)
        elif kind == "RMSNorm":
            norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        else:
            raise ValueError(f"CPUTorchNorm supports LayerNorm and RMSNorm, not {kind!r}")
        norm = norm.to(dtype=config.params_dtype)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))
        return norm


def get_cpu_gpt_layer_spec(
    num_experts: Optional[int] = None,
    moe_grouped_gemm: bool = False,
    normalization: str = "RMSNorm",
    qk_layernorm: bool = False,
):
    """``get_gpt_layer_local_spec`` with every ``WrappedTorchNorm`` replaced by ``CPUTorchNorm``.

    Works with and without sequence parallelism.  The final layernorm of the
    block comes from ``transformer_block.LayerNormImpl``, which
    ``apply_cpu_adaptations`` points at ``CPUTorchNorm`` (or use
    :func:`get_cpu_gpt_block_spec`, which needs no patch for it).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    spec = get_gpt_layer_local_spec(
        num_experts=num_experts,
        moe_grouped_gemm=moe_grouped_gemm,
        qk_layernorm=qk_layernorm,
        normalization=normalization,
    )
    _replace_norm_in_spec(spec, WrappedTorchNorm, CPUTorchNorm)
    if num_experts:
        # The local spec saves every layer's pre-MLP norm under TE's fused name (mlp.linear_fc1.layer_norm_weight),
        # but TE's MoE spec keeps a norm module (only a dense MLP fuses it), saved as pre_mlp_layernorm.weight: keep
        # TE's key, so that MoE checkpoints move between machines with and without TE (the GPU path is the norm).
        keys = dict(spec.submodules.sharded_state_dict_keys_map)
        keys.pop("pre_mlp_layernorm.", None)
        spec.submodules.sharded_state_dict_keys_map = keys
    return spec


def get_cpu_gpt_block_spec(config, layer_spec=None, vp_stage=None, pp_rank=None):
    """TransformerBlockSubmodules for this PP stage with ``CPUTorchNorm`` as final norm."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if layer_spec is None:
        layer_spec = get_cpu_gpt_layer_spec(
            num_experts=config.num_moe_experts,
            normalization=config.normalization,
            qk_layernorm=config.qk_layernorm,
        )
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=CPUTorchNorm)


def _replace_norm_in_spec(obj, old, new, _seen=None):
    """Recursively replace ``old`` by ``new`` in ModuleSpec / submodule dataclasses."""
    import dataclasses

    if _seen is None:
        _seen = set()
    if id(obj) in _seen:
        return
    _seen.add(id(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if value is old:
                setattr(obj, field.name, new)
            else:
                _replace_norm_in_spec(value, old, new, _seen)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _replace_norm_in_spec(item, old, new, _seen)


def allreduce_sequence_parallel_grads(model, tp_group=None) -> None:
    """SUM-all-reduce ``.grad`` of params flagged ``sequence_parallel`` across the TP group.

    For models not wrapped in Megatron DDP (which would do this in
    ``finalize_model_grads``).  ``model`` is a module or a list of modules.
    """
    from megatron.core import parallel_state

    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    if torch.distributed.get_world_size(tp_group) <= 1:
        return
    modules = model if isinstance(model, (list, tuple)) else [model]
    for module in modules:
        for param in module.parameters():
            if getattr(param, "sequence_parallel", False) and param.grad is not None:
                torch.distributed.all_reduce(param.grad, group=tp_group)


# ----------------------------------------------------------------------------
# 5. Tensor.cuda() inside LanguageModule.setup_embeddings_and_output_layer
# ----------------------------------------------------------------------------
def _wrap_setup_embeddings(orig):
    def setup_embeddings_and_output_layer(self, *args, **kwargs):
        real_cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t  # type: ignore[method-assign]
        try:
            return orig(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = real_cuda  # type: ignore[method-assign]

    setup_embeddings_and_output_layer.__wrapped__ = orig
    setup_embeddings_and_output_layer.__doc__ = orig.__doc__
    return setup_embeddings_and_output_layer


# ----------------------------------------------------------------------------
# 7. CUDA tensor-type names while the Megatron optimizers sort their params
# ----------------------------------------------------------------------------
_REAL_TENSOR_TYPE = torch.Tensor.type


def _cuda_type_name(self, dtype=None, non_blocking=False, **kwargs):
    """``Tensor.type()`` naming a CPU tensor as its CUDA twin (``torch.FloatTensor`` -> ``torch.cuda.FloatTensor``)."""
    name = _REAL_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)
    if dtype is None and isinstance(name, str) and not self.is_cuda and name.startswith("torch."):
        return "torch.cuda." + name[len("torch."):]
    return name


def _with_cuda_type_names(orig):
    def wrapper(*args, **kwargs):
        outer = torch.Tensor.type  # a nested constructor must not restore the real name for its caller
        torch.Tensor.type = _cuda_type_name  # type: ignore[method-assign]
        try:
            return orig(*args, **kwargs)
        finally:
            torch.Tensor.type = outer  # type: ignore[method-assign]

    wrapper.__wrapped__ = orig
    wrapper.__doc__ = orig.__doc__
    return wrapper


# ----------------------------------------------------------------------------
# apply / undo
# ----------------------------------------------------------------------------
def _set_attr(obj: Any, name: str, value: Any) -> None:
    _UNDO.append((obj, name, obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__")
                  else getattr(obj, name, _MISSING)))
    setattr(obj, name, value)


def cpu_adaptations_applied() -> bool:
    import megatron.core

    return bool(getattr(megatron.core, _MARKER, False))


def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's ``clip_grad_by_total_norm_fp32`` minus its ``torch.cuda.FloatTensor`` assertion."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for p in parameters:
            g = getattr(p, attr, None)
            if g is not None:
                g.detach().mul_(clip_coeff)


def _cpu_get_grad_norm_fp64(grads_for_norm, norm_type=2, grad_stats_parallel_group=None):
    """Megatron's ``get_grad_norm_fp32`` with the L2 norm's sum of squares accumulated in float64 (adaptation 6)."""
    if float(norm_type) != 2.0:
        return _ORIG_GET_GRAD_NORM(grads_for_norm, norm_type, grad_stats_parallel_group)
    from megatron.core.utils import get_data_parallel_group_if_dtensor, to_local_if_dtensor

    if isinstance(grads_for_norm, torch.Tensor):
        grads_for_norm = [grads_for_norm]
    data_parallel_group = None
    for grad in grads_for_norm:
        data_parallel_group = get_data_parallel_group_if_dtensor(grad, data_parallel_group)
    total = torch.zeros(1, dtype=torch.float64)
    for grad in grads_for_norm:
        g = to_local_if_dtensor(grad).detach().reshape(-1).double()
        total += torch.dot(g, g)
    # float64 over the ranks too (every rank sends a float64 buffer, also a rank with no grads)
    if data_parallel_group:
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=data_parallel_group)
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=grad_stats_parallel_group)
    return total.item() ** 0.5


_ORIG_GET_GRAD_NORM = None


def apply_cpu_adaptations() -> None:
    """Patch Megatron-core for CPU/gloo execution (idempotent; see module docstring)."""
    if torch.cuda.is_available():
        raise RuntimeError(
            "megatron_simreg.megatron.cpu_compat.apply_cpu_adaptations() is for CPU-only runs; "
            "torch.cuda.is_available() is True, so nothing was patched. Run Megatron unmodified "
            "on GPU."
        )
    import megatron.core

    if getattr(megatron.core, _MARKER, False):
        return

    try:
        # 1. device shim
        for mod_name in _SHIMMED_MODULES:
            mod = importlib.import_module(mod_name)
            if getattr(mod, "torch", None) is torch:
                _set_attr(mod, "torch", _TORCH_SHIM)

        # 2. RNG
        random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
        _set_attr(random_mod, "_get_cuda_rng_state", _cpu_get_rng_state)
        _set_attr(random_mod, "_set_cuda_rng_state", _cpu_set_rng_state)
        _set_attr(random_mod.CudaRNGStatesTracker, "fork", _make_cpu_fork(random_mod))

        # 3. te_general_gemm NameError in moe_utils without TE
        moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
        if not hasattr(moe_utils, "te_general_gemm"):
            _set_attr(moe_utils, "te_general_gemm", None)

        # 4. SP-capable norm as the block's final norm (only replaces the torch fallback)
        tblock = importlib.import_module("megatron.core.transformer.transformer_block")
        torch_norm = importlib.import_module("megatron.core.transformer.torch_norm")
        if tblock.LayerNormImpl is torch_norm.WrappedTorchNorm:
            _set_attr(tblock, "LayerNormImpl", CPUTorchNorm)

        # 5. Tensor.cuda() in tied-embedding setup
        lm_mod = importlib.import_module(
            "megatron.core.models.common.language_module.language_module"
        )
        cls = lm_mod.LanguageModule
        _set_attr(
            cls,
            "setup_embeddings_and_output_layer",
            _wrap_setup_embeddings(cls.setup_embeddings_and_output_layer),
        )

        # 6. grad clipping asserts CUDA tensors
        clip_mod = importlib.import_module("megatron.core.optimizer.clip_grads")
        opt_mod = importlib.import_module("megatron.core.optimizer.optimizer")
        _set_attr(clip_mod, "clip_grad_by_total_norm_fp32", _cpu_clip_grad_by_total_norm_fp32)
        _set_attr(opt_mod, "clip_grad_by_total_norm_fp32", _cpu_clip_grad_by_total_norm_fp32)
        # ... and its grad norm is a per-tensor fp32 norm (the float64 one keeps layouts comparable)
        global _ORIG_GET_GRAD_NORM
        _ORIG_GET_GRAD_NORM = _ORIG_GET_GRAD_NORM or clip_mod.get_grad_norm_fp32
        _set_attr(clip_mod, "get_grad_norm_fp32", _cpu_get_grad_norm_fp64)
        _set_attr(opt_mod, "get_grad_norm_fp32", _cpu_get_grad_norm_fp64)

        # 7. the optimizers sort params by CUDA tensor-type name in their constructors
        dist_opt_mod = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
        for cls in (opt_mod.Float16OptimizerWithFloat16Params, dist_opt_mod.DistributedOptimizer):
            _set_attr(cls, "__init__", _with_cuda_type_names(cls.__init__))
        _adapt_dist_checkpointing()  # 8.
    except Exception:
        _undo_all()
        raise

    setattr(megatron.core, _MARKER, True)
    logging.getLogger(__name__).debug("megatron CPU adaptations applied")


def _undo_all() -> None:
    while _UNDO:
        obj, name, orig = _UNDO.pop()
        if orig is _MISSING:
            try:
                delattr(obj, name)
            except AttributeError:
                pass
        else:
            setattr(obj, name, orig)


def undo_cpu_adaptations() -> None:
    """Restore every object patched by :func:`apply_cpu_adaptations` (no-op if not applied)."""
    import megatron.core

    _undo_all()
    if hasattr(megatron.core, _MARKER):
        delattr(megatron.core, _MARKER)


# ----------------------------------------------------------------------------
# 8. dist-checkpointing (the trainer's torch_dist checkpoints)
# ----------------------------------------------------------------------------
_DIST_CKPT_MODULES = (
    # FileSystemWriterAsync.preload_tensors: torch.cuda.synchronize() after the (no-op) copy to host
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    # save_state_dict_async_finalize: the failure flag is broadcast from torch.cuda.current_device()
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)


def _adapt_dist_checkpointing() -> None:
    """Put the dist-checkpointing modules that the synchronous ``torch_dist`` save reaches in the device shim (1).

    (Reloading the distributed optimizer's state into torch's AdamW needs
    :func:`megatron_simreg.megatron.compat.keep_torch_adam_step`, which is not
    CPU-specific: a GPU without TE or apex uses torch's AdamW too. The
    trainer's Megatron backend applies it.)

    ``dist_checkpointing.save`` with the default ``torch_dist`` strategy (and
    ``FullyParallelSaveStrategyWrapper``) calls ``torch.cuda.synchronize()``
    in ``filesystem_async.preload_tensors`` and makes a flag tensor on
    ``torch.cuda.current_device()`` in ``state_dict_saver`` (raises without
    CUDA); nothing else on its save or load path (default load strategy)
    touches CUDA, and every collective it uses (all_gather_object,
    broadcast, barrier) runs on gloo. Not adapted: the fully parallel *load*
    wrapper and ``exchange_utils`` (CUDA exchange buffers), async saves
    (``async_utils``: CUDA flag tensors, per-process CUDA device setup).
    """
    for mod_name in _DIST_CKPT_MODULES:
        mod = importlib.import_module(mod_name)
        if getattr(mod, "torch", None) is torch:
            _set_attr(mod, "torch", _TORCH_SHIM)
