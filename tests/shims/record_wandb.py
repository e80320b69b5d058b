"""Runs the ``megatron-simreg`` CLI with ``wandb.init`` wrapped: each ``run.log`` call is also appended, as JSON, to
``$SIMREG_WANDB_RECORD``, so a test can read what wandb was given (an offline run keeps it in wandb's own binary
format). wandb itself runs unchanged (offline under ``WANDB_MODE=offline``)."""

import json
import os
import runpy
import sys

import wandb

_init = wandb.init


def init(*args, **kwargs):
    run = _init(*args, **kwargs)
    log = run.log

    def recorded(data, step=None, **kw):
        with open(os.environ["SIMREG_WANDB_RECORD"], "a") as f:
            f.write(json.dumps({"step": step, "project": kwargs.get("project"), "name": kwargs.get("name"),
                                **data}) + "\n")
        return log(data, step=step, **kw)

    run.log = recorded
    return run


# module level: the trainer's spawned workers import this file as __mp_main__ and must get the same patch
wandb.init = init

if __name__ == "__main__":
    sys.argv = ["megatron-simreg", *sys.argv[1:]]
    runpy.run_module("megatron_simreg.cli", run_name="__main__")
