"""``megatron-simreg env``: versions, and whether CUDA, TransformerEngine and NVIDIA apex are present."""

import importlib
import platform
import sys
from importlib.metadata import PackageNotFoundError, version


def add_arguments(p):
    pass


def _version(dist_name):
    try:
        return version(dist_name)
    except PackageNotFoundError:
        return "not installed"


def main(args) -> int:
    import torch

    rows = [("python", sys.version.split()[0]), ("platform", platform.platform()),
            ("megatron-simreg", _version("megatron-simreg")), ("torch", torch.__version__)]
    rows += [(name, _version(name)) for name in ("megatron-core", "deepspeed", "transformers", "sentencepiece", "triton")]
    cuda = torch.cuda.is_available()
    rows.append(("cuda", f"yes ({torch.cuda.get_device_name()}, CUDA {torch.version.cuda})" if cuda else "no"))
    try:
        importlib.import_module("transformer_engine")
        rows.append(("transformer-engine", _version("transformer-engine") + " (importable)"))
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        rows.append(("transformer-engine", "no"))
    # NVIDIA apex ships fused_layer_norm_cuda; the unrelated PyPI "apex" does not.
    try:
        importlib.import_module("fused_layer_norm_cuda")
        rows.append(("nvidia-apex", "yes"))
    except ImportError:
        rows.append(("nvidia-apex", "no"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
