"""Planted bug for tests/test_megatron_lm.py: the Megatron-LM adapter trains SimReg with lambda 10% too large.

Run in place of ``examples/pretrain_gpt_simreg.py``; the hand check (``tests/megatron_lm_record.py``) reads lambda
from the flags, so it must see the gradient move.
"""

import runpy
import sys
from pathlib import Path

import megatron_simreg.megatron_lm as adapter

LAUNCHER = Path(__file__).resolve().parents[2] / "examples" / "pretrain_gpt_simreg.py"

if __name__ == "__main__":
    original = adapter.configs_from_args

    def planted(args):
        simreg, jreg = original(args)
        if simreg is not None:
            simreg.weight *= 1.1
        return simreg, jreg

    adapter.configs_from_args = planted
    sys.argv[0] = str(LAUNCHER)
    runpy.run_path(str(LAUNCHER), run_name="__main__")
