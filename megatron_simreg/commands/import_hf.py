"""``megatron-simreg import-hf``: a transformers Llama/Mistral/Qwen2/Qwen3/Mixtral/Qwen3-MoE dir -> a checkpoint ``train --load`` continues from."""

import sys


def add_arguments(p):
    p.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--save", required=True, help="new checkpoint directory to write (iteration 0); must be empty or missing")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="recorded as the layout; any TP/PP/DP layout whose TP divides the vocabulary rows can load "
                        "the checkpoint")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="checks the layers split evenly")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="pad the vocabulary to a multiple of this x TP. Default: keep the HF model's vocab_size "
                        "(rounded up to a multiple of TP only), as Megatron-Bridge does: padded rows are zeros whose "
                        "logits join the softmax, so padding changes the model's loss")
    p.add_argument("--seq-length", type=int, default=None, help="recorded in meta.json (and in the printed train flags) as a default training sequence length; "
                        "each train run picks its own (max_position_embeddings is always recorded)")
    p.add_argument("--seed", type=int, default=1234, help="recorded in meta.json (no RNG state is stored)")
    p.add_argument("--verify", action="store_true",
                   help="run Megatron and transformers on the same tokens; exit 1 above max |dlogit| 1e-4, "
                        "writing nothing")


def main(args) -> int:
    from ..conversion.import_ import import_hf
    from ..conversion.layout import ConversionError

    try:
        parity = import_hf(args.hf, args.save, tp=args.tensor_model_parallel_size,
                           pp=args.pipeline_model_parallel_size,
                           make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                           seq_length=args.seq_length, seed=args.seed, verify=args.verify)
    except ConversionError as e:
        print(f"import-hf: error: {e}", file=sys.stderr)
        return 2
    return 0 if parity is None or parity.ok else 1
