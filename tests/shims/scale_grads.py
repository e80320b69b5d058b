"""Test-only planted bug: ``python tests/shims/scale_grads.py train ...`` runs the CLI with every gradient
multiplied by ``SIMREG_PLANT_GRAD_FACTOR`` ("2", or "1/dp" for 1 / the data-parallel size) after megatron's
``finalize_model_grads`` (the DP all-reduce / reduce-scatter and the TP/PP sums) and before the optimizer step:
what a "sum instead of mean" (2x at DP=2) or a doubled "mean" (1/DP) data-parallel bug does to the update.

The layout tests' comparison (``trainer_utils.assert_same_training``) must fail on such a run (test_training.py).
Megatron backend only (DeepSpeed does not call ``finalize_model_grads``).
"""

import os
import runpy
import sys

import megatron.core.distributed as _distributed

_finalize = _distributed.finalize_model_grads


def _factor():
    spec = os.environ["SIMREG_PLANT_GRAD_FACTOR"]
    if spec == "1/dp":
        from megatron.core import parallel_state as ps

        return 1.0 / ps.get_data_parallel_world_size()
    return float(spec)


def finalize_model_grads(model, *args, **kwargs):
    _finalize(model, *args, **kwargs)
    factor = _factor()
    for chunk in model:
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            buffer.grad_data.mul_(factor)


# module level: the trainer's spawned workers import this file as __mp_main__ and must get the same patch
# (the backend imports finalize_model_grads from megatron.core.distributed when it is built, in the worker)
_distributed.finalize_model_grads = finalize_model_grads

if __name__ == "__main__":
    sys.argv = ["megatron-simreg", *sys.argv[1:]]
    runpy.run_module("megatron_simreg.cli", run_name="__main__")
