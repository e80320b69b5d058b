"""Everything that depends on the megatron-core version, in one place.

Supported: megatron-core 0.16.1 through 0.19.x. The patch touches only the
symbols resolved here; when a new release moves one, :func:`resolve` fails
with an error naming the version and the symbol instead of patching the
wrong thing.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

MIN_VERSION = (0, 16, 1)
MAX_VERSION_EXCLUSIVE = (0, 20, 0)
SUPPORTED = "0.16.1 to 0.19.x"


def _parse(v: str):
    parts = []
    for piece in v.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def megatron_core_version() -> str:
    try:
        return version("megatron-core")
    except PackageNotFoundError:
        try:
            from megatron.core import package_info

            return package_info.__version__
        except ImportError as e:
            raise ImportError(
                "megatron-core is not installed; megatron-simreg's Megatron integration supports "
                f"{SUPPORTED}: pip install 'megatron-core>=0.16.1,<0.20'"
            ) from e


def check_version() -> str:
    """Return the installed version, or raise if it is outside the supported range."""
    v = megatron_core_version()
    if not MIN_VERSION <= _parse(v) < MAX_VERSION_EXCLUSIVE:
        raise RuntimeError(
            f"megatron-core {v} is not supported by megatron-simreg (supported: {SUPPORTED}). "
            "Install a supported release, e.g. pip install 'megatron-core>=0.16.1,<0.20' "
            "(0.17 and later need Python >= 3.12)."
        )
    return v


def resolve(module: str, attr: str):
    """``module.attr``, or an error naming the megatron-core version and the missing symbol."""
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(
            f"megatron-simreg needs {module}.{attr}, which megatron-core {megatron_core_version()} does not "
            f"provide (moved or renamed?). Supported versions: {SUPPORTED}."
        ) from e
    return obj


def gpt_model_class():
    return resolve("megatron.core.models.gpt.gpt_model", "GPTModel")


def schedule_plan_method(gpt_model):
    """``GPTModel.build_schedule_plan`` (the combined 1F1B schedule's entry point), or None where there is none."""
    return getattr(gpt_model, "build_schedule_plan", None)


def schedules_module():
    resolve("megatron.core.pipeline_parallel.schedules", "forward_step")
    return importlib.import_module("megatron.core.pipeline_parallel.schedules")


def layer_output_hidden(output):
    """A TransformerLayer returns ``(hidden, context)``; 0.17+ blocks may return extras too."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_layer_output_hidden(output, hidden):
    """``output`` with its hidden states replaced (the inverse of :func:`layer_output_hidden`)."""
    if isinstance(output, (tuple, list)):
        return type(output)([hidden, *output[1:]])
    return hidden


def transformer_config_defaults() -> dict:
    """TransformerConfig values that spell a field's default in its current form: 0.16's default
    ``cuda_graph_scope="full"`` warns that it is deprecated for the equivalent ``[]`` (the whole layer) on every
    config built; releases without the field get nothing."""
    import dataclasses

    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    scope = fields.get("cuda_graph_scope")
    return {"cuda_graph_scope": []} if scope is not None and scope.default == "full" else {}


def define_moe_te_gemm() -> None:
    """Without TransformerEngine, 0.16's MoE router reads ``moe_utils.te_general_gemm``, which its failed TE import
    leaves undefined (``NameError`` on the first forward); ``None`` selects its existing ``torch.mm`` path."""
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def keep_torch_adam_step() -> None:
    """Let megatron-core's DistributedOptimizer reload its state into torch's AdamW (idempotent).

    megatron-core falls back to ``torch.optim.AdamW`` when neither
    TransformerEngine nor apex is importable: always on CPU, and on a GPU
    machine without them. Its per-parameter state holds a ``"step"`` tensor,
    which two megatron-core 0.16.1 load paths mishandle:

    1. ``load_parameter_state_from_fully_reshardable`` (and the other
       reshardable loads) pass ``{"param", "exp_avg", "exp_avg_sq"}`` to
       ``_set_main_param_and_optimizer_states``, which copies *every* key of
       the current state: ``KeyError: 'step'``. The step already set by
       ``load_state_dict`` is passed through instead.
    2. ``load_state_dict`` gives every parameter the *same* step tensor, which
       torch's foreach AdamW then increments once per parameter (step 2 -> 16
       after one step of a 14-parameter model: wrong bias corrections, so a
       resumed run drifts). Each parameter gets its own copy.
    3. ``dp_reshardable`` (Megatron-LM's default format) does not save the
       per-parameter step (a ``LocalNonpersistentObject``, "handled via
       param_groups"), so its load hands back this run's own pre-load step and
       copies it over the one ``load_state_dict`` has just set from the saved
       param groups (seen: a resumed DP=2 run's loss off by 1e-3). The step is
       always the one the param groups set.

    With TE's or apex's FusedAdam the state has no per-parameter ``"step"``
    and the wrapper passes everything through unchanged.
    """
    cls = resolve("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer")
    original = cls._set_main_param_and_optimizer_states
    if getattr(original, _ADAM_STEP_MARKER, False):
        return

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state:
                state["step"] = state["step"].clone()  # (2)
                tensors = {**tensors, "step": state["step"]}  # (1), (3)
        return original(self, model_param, tensors)

    _set_main_param_and_optimizer_states.__wrapped__ = original
    setattr(_set_main_param_and_optimizer_states, _ADAM_STEP_MARKER, True)
    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states


_ADAM_STEP_MARKER = "_megatron_simreg_keeps_adam_step"


def load_dp_reshardable_without_grad() -> None:
    """Run ``DistributedOptimizer.load_parameter_state_from_dp_reshardable`` under ``torch.no_grad()`` (idempotent).

    megatron-core 0.16.1's loader of its default ``dp_reshardable`` format, unlike its ``fully_reshardable`` and
    ``fs_model_space`` siblings, lacks ``@torch.no_grad()`` and copies into the main params in place; with fp32
    weights those are views of the model's leaf params (``_build_model_and_main_param_groups``), so the copy raises
    "a view of a leaf Variable that requires grad is being used in an in-place operation", on any device.
    """
    import torch

    cls = resolve("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer")
    original = cls.load_parameter_state_from_dp_reshardable
    if getattr(original, _NO_GRAD_MARKER, False):
        return

    def load_parameter_state_from_dp_reshardable(self, state_dict):
        with torch.no_grad():
            return original(self, state_dict)

    load_parameter_state_from_dp_reshardable.__wrapped__ = original
    setattr(load_parameter_state_from_dp_reshardable, _NO_GRAD_MARKER, True)
    cls.load_parameter_state_from_dp_reshardable = load_parameter_state_from_dp_reshardable


_NO_GRAD_MARKER = "_megatron_simreg_no_grad"
