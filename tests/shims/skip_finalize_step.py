"""Test-only planted bug: ``SIMREG_PLANT_SKIP=embedding|tp python tests/shims/skip_finalize_step.py train ...`` runs
the CLI with one of megatron's ``finalize_model_grads`` steps skipped: the tied word embedding's gradient not summed
over the first and last pipeline stages (``embedding``), or the sequence-parallel norm / router gradients not summed
over the tensor-parallel group (``tp``).

Used by hand to see the combined-layout comparisons of ``test_training.py`` fail (the commands are in its tolerance
comment). Note the lookup through ``sys.modules``: ``megatron.core.distributed.finalize_model_grads`` is also the name
of a function that the package exports, so ``import ... as`` would return the function, and a patch on it would never
run.
"""

import os
import runpy
import sys

import megatron.core.distributed.finalize_model_grads  # noqa: F401

_module = sys.modules["megatron.core.distributed.finalize_model_grads"]
_STEPS = {"embedding": "_allreduce_word_embedding_grads", "tp": "_allreduce_non_tensor_model_parallel_grads"}
# module level: the trainer's spawned workers import this file as __mp_main__ and must get the same patch
setattr(_module, _STEPS[os.environ["SIMREG_PLANT_SKIP"]], lambda *args, **kwargs: None)

if __name__ == "__main__":
    sys.argv = ["megatron-simreg", *sys.argv[1:]]
    runpy.run_module("megatron_simreg.cli", run_name="__main__")
