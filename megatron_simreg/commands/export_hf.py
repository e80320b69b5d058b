"""``megatron-simreg export-hf``: a checkpoint (Megatron or DeepSpeed backend, any TP/PP) -> a transformers dir."""

import sys


def add_arguments(p):
    p.add_argument("--load", required=True, help="checkpoint directory (the trainer's --save)")
    p.add_argument("--iteration", type=int, default=None, help="default: latest_checkpointed_iteration.txt")
    p.add_argument("--out", required=True, help="output directory for the Hugging Face model")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--tokenizer-model", default=None, help="the tokenizer to export: a sentencepiece .model or a Hugging Face tokenizer directory "
                        "(default: the one meta.json records; for an import-hf checkpoint, its source directory's)")
    p.add_argument("--verify", action="store_true",
                   help="run Megatron and transformers on the same tokens and check that the exported tokenizer "
                        "gives the training tokenizer's ids; exit 1 above max |dlogit| 1e-4 or on a tokenizer "
                        "mismatch, leaving --out as it was")


def main(args) -> int:
    from ..conversion.export import export_hf
    from ..conversion.layout import ConversionError
    from ..training.checkpoint import CheckpointError

    try:
        parity = export_hf(args.load, args.out, iteration=args.iteration, dtype=args.dtype, verify=args.verify,
                           tokenizer_model=args.tokenizer_model)
    except (ConversionError, CheckpointError) as e:
        print(f"export-hf: error: {e}", file=sys.stderr)
        return 2
    return 0 if parity is None or parity.ok else 1
