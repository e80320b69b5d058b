"""Known-harmless warnings: filtered in this one place, replaced by one line.

Without TransformerEngine or NVIDIA apex (every CPU run, and GPU machines without them), megatron-core says at
import, in every process, that it uses its own fallbacks (torch norms and optimizers, Python
``multi_tensor_applier``); torch and megatron-core's checkpointing announce API deprecations that are theirs to
make on every save and load. Nothing is wrong and there is nothing to fix, and repeated for every process and run
they drown the progress lines. :func:`install` ignores exactly these (by category, the module that warns, and the
message), so every other warning stays visible, and :func:`notice` is the one line that replaces the fallback
notices.

``python -W ...`` or ``PYTHONWARNINGS`` (any explicit warning setting) turns the filter off: everything is shown.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings

# (category, module that issues it (a regex on its __name__), message (a regex on its start))
KNOWN = (
    # megatron-core without TransformerEngine / apex: optimizer, clip_grads, backends, gpt_layer_specs, megatron_fsdp
    (UserWarning, r"megatron\.core\.", r"(Transformer Engine and Apex are|Apex is) not installed\. Falling back to "),
    # torch's deprecations of APIs megatron-core's checkpointing and distributed optimizer call
    (FutureWarning, r"torch\.distributed\.c10d_logger",
     r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
    (FutureWarning, r"torch\.distributed\.checkpoint\.",
     r"Please use DTensor instead and we are deprecating ShardedTensor"),
    (FutureWarning, r"megatron\.core\.dist_checkpointing\.", r"`load_state_dict` is deprecated"),
)

NOTICE = ("{where}: TransformerEngine/apex not installed, megatron-core uses its local fallbacks "
          "(its warnings about it are hidden; python -W default shows them)")


_installed = False


def install() -> bool:
    """Ignore the :data:`KNOWN` warnings in this process; returns False (and does nothing) when the user set warning
    options. Idempotent."""
    global _installed
    if sys.warnoptions:
        return False
    for category, module, message in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    _installed = True
    return True


def notice() -> str | None:
    """The one line that replaces megatron-core's fallback warnings; None when they are not hidden here (no
    :func:`install`) or TE and apex are both installed."""
    if not _installed or (importlib.util.find_spec("transformer_engine") and importlib.util.find_spec("apex")):
        return None
    import torch

    return NOTICE.format(where="GPU run" if torch.cuda.is_available() else "CPU run")
