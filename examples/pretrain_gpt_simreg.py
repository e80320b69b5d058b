#!/usr/bin/env python
"""Megatron-LM's ``pretrain_gpt.py`` with SimReg and JREG: run it in its place, with the same flags plus ours.

    export MEGATRON_LM_PATH=/path/to/Megatron-LM        # or put that directory on PYTHONPATH
    torchrun --nproc-per-node 8 examples/pretrain_gpt_simreg.py <your pretrain_gpt.py flags> \\
        --simreg-weight 0.1 --jreg-weight 3.0

Megatron-LM's own ``pretrain_gpt.py`` runs as the main script, unchanged: its dataset provider, model
provider, ``forward_step`` and ``loss_func``. Before it starts, :func:`megatron_simreg.megatron_lm.install`
adds our flags, applies the patch from ``get_args()`` and hooks ``train_step`` (see that module's docstring).
"""

import os
import runpy
import sys

from megatron_simreg.megatron_lm import find_megatron_lm, install


def main() -> None:
    script = find_megatron_lm()
    install()
    sys.argv[0] = script
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python pretrain_gpt.py` would have it
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
