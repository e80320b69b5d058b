"""Test-only: ``python tests/shims/no_cpu_optimizer_fix.py train ...`` runs the CLI as a GPU without TE or apex
would reach the optimizer: torch's AdamW inside megatron-core's DistributedOptimizer, and nothing from the CPU
adaptations on ``DistributedOptimizer._set_main_param_and_optimizer_states`` (on a GPU they are never applied).

Every other CPU adaptation stays (the model still runs on CPU); only that method is put back as it was before
:func:`apply_cpu_adaptations` ran, so a fix that lives only in the CPU shims is invisible here.
"""

import runpy
import sys

from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from megatron_simreg.megatron import cpu_compat

_apply = cpu_compat.apply_cpu_adaptations


def _apply_without_the_optimizer_fix():
    before = DistributedOptimizer._set_main_param_and_optimizer_states
    _apply()
    DistributedOptimizer._set_main_param_and_optimizer_states = before


# module level: the trainer's spawned workers import this file as __mp_main__ and must get the same patch
cpu_compat.apply_cpu_adaptations = _apply_without_the_optimizer_fix

if __name__ == "__main__":
    sys.argv = ["megatron-simreg", *sys.argv[1:]]
    runpy.run_module("megatron_simreg.cli", run_name="__main__")
