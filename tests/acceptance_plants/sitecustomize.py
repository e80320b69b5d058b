"""Plants one bug of a ``tools/gpu_acceptance.py`` check's kind into every Python process it starts (test only).

``tests/test_gpu_acceptance.py`` puts this directory first on ``PYTHONPATH`` and sets
``SIMREG_ACCEPTANCE_PLANT`` to a check's number; the interpreter imports this ``sitecustomize`` at start-up, and
it patches the named module right after that module is first imported (before anything can copy a name out of it).
Nothing in the product reads the variable. Without it (or with an unknown value) this module does nothing.

1. train: the optimizer steps with a step size of 0 (the gradients and Adam's state are computed, the weights never
   change: the model never learns).
2. resume: a resume restores the weights and the LR schedule but not the optimizer state (Adam's moments and step).
3. conversion: export-hf writes layer 0's ``gate_proj`` and ``up_proj`` swapped (a classic SwiGLU mapping bug,
   which an export/import round trip alone cannot see: the import swaps nothing back, so both sides agree).
4. recompute: under full recompute, each checkpointed layer's deferred JREG term is attached with weight 0 (its
   gradient is dropped; the logged JREG loss is unchanged).
5. norms: ``param_role`` misclassifies the final norm's gain as a matrix, so it is initialized N(0, std) like one
   (the old check selected the norms with that same ``param_role``, and skipped it).
"""

import importlib.abc
import importlib.util
import os
import sys

PLANT = os.environ.get("SIMREG_ACCEPTANCE_PLANT", "")


def _no_update(backends):
    original = backends.MegatronBackend.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        step = self.optimizer.step_with_ready_grads

        def step_with_ready_grads():
            for group in self.optimizer.param_groups:  # the schedule sets the rate again before every step
                group["lr"] = 0.0
            return step()

        self.optimizer.step_with_ready_grads = step_with_ready_grads

    backends.MegatronBackend.__init__ = __init__


def _resume_without_optimizer_state(checkpoint):
    original = checkpoint.resume

    def resume(*args, **kwargs):
        kwargs["load_optim"] = False
        return original(*args, **kwargs)

    checkpoint.resume = resume


def _export_swaps_gate_and_up(export):
    original = export.write_safetensors

    def write_safetensors(state, out, *args, **kwargs):
        gate, up = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
        state = dict(state)
        state[gate], state[up] = state[up], state[gate]
        return original(state, out, *args, **kwargs)

    export.write_safetensors = write_safetensors


def _recompute_drops_jreg(patch):
    original = patch._Deferred

    def deferred(valid, scale, metric):
        return original(valid, scale * 0.0, metric)

    patch._Deferred = deferred


def _final_norm_misclassified(param_names):
    original = param_names.param_role

    def param_role(name):
        return param_names.MATRIX if "final_layernorm" in name else original(name)

    param_names.param_role = param_role


PLANTS = {
    "1": ("megatron_simreg.training.backends", _no_update),
    "2": ("megatron_simreg.training.checkpoint", _resume_without_optimizer_state),
    "3": ("megatron_simreg.conversion.export", _export_swaps_gate_and_up),
    "4": ("megatron_simreg.megatron.patch", _recompute_drops_jreg),
    "5": ("megatron_simreg.megatron.param_names", _final_norm_misclassified),
}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds ``name`` with the other finders and runs ``patch(module)`` right after the module has executed."""

    def __init__(self, name, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module, patch = spec.loader.exec_module, self.patch

        def exec_and_patch(module):
            exec_module(module)
            patch(module)
            print(f"acceptance plant {PLANT}: patched {fullname}", file=sys.stderr, flush=True)

        spec.loader.exec_module = exec_and_patch
        sys.meta_path.remove(self)  # once
        return spec


def _chain() -> None:
    """Run the ``sitecustomize`` this one shadows (the next on ``sys.path``), if there is one."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if os.path.abspath(entry or os.curdir) == here:
            continue
        path = os.path.join(entry or os.curdir, "sitecustomize.py")
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return


if PLANT in PLANTS:
    sys.meta_path.insert(0, _PatchAfterImport(*PLANTS[PLANT]))
_chain()
