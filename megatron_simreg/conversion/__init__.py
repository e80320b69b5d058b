"""Checkpoint conversion between our Megatron-core checkpoints and Hugging Face ``transformers``
(dense -> ``LlamaForCausalLM``, MoE -> ``MixtralForCausalLM``), with parity checks."""

from .layout import (ConversionError, fuse_gate_up, fuse_qkv, hf_to_megatron, megatron_to_hf, merge_tp, split_gate_up,
                     split_qkv)

__all__ = ["ConversionError", "fuse_qkv", "split_qkv", "fuse_gate_up", "split_gate_up", "merge_tp", "megatron_to_hf",
           "hf_to_megatron", "export_hf", "import_hf"]


def export_hf(*args, **kwargs):
    from .export import export_hf as _f

    return _f(*args, **kwargs)


def import_hf(*args, **kwargs):
    from .import_ import import_hf as _f

    return _f(*args, **kwargs)
