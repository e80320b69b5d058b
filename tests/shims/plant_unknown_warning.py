"""Test-only: ``python tests/shims/plant_unknown_warning.py train ...`` runs the CLI with one planted warning that
nobody filters: issued as megatron-core's (the module the known-warning filter watches) with a new message, when the
trainer builds its model. ``test_entry_points.py`` checks that it stays visible while the known ones are hidden.
"""

import runpy
import sys
import warnings

import megatron_simreg.training.trainer as _trainer

PLANTED = "planted: a megatron-core warning nobody has seen before"
_build_model = _trainer.build_model


def build_model(*args, **kwargs):
    warnings.warn_explicit(PLANTED, UserWarning, "megatron/core/planted.py", 1, module="megatron.core.planted")
    return _build_model(*args, **kwargs)


# module level: the trainer's spawned workers import this file as __mp_main__ and must get the same patch
_trainer.build_model = build_model

if __name__ == "__main__":
    sys.argv = ["megatron-simreg", *sys.argv[1:]]
    runpy.run_module("megatron_simreg.cli", run_name="__main__")
