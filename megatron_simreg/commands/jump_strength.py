"""``megatron-simreg jump-strength``: per-layer angular distances and JREG's jump strength of a Hugging Face LM."""

import sys

DEFAULT_TEXT = "sample_text.txt (built-in)"


def add_arguments(p):
    p.add_argument("--hf", required=True, metavar="MODEL_DIR",
                   help="local Hugging Face causal-LM directory (config.json, weights, tokenizer)")
    p.add_argument("--text-file", default=None,
                   help="plain UTF-8 text to probe with (default: a short English text shipped with the package)")
    p.add_argument("--seq-length", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--max-sequences", type=int, default=8, help="at most this many sequences (default 8)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass (default 1)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _read_text(path):
    if path is None:
        from importlib import resources

        return resources.files("megatron_simreg.analysis").joinpath("data/sample_text.txt").read_text("utf-8"), \
            DEFAULT_TEXT
    with open(path, encoding="utf-8") as f:
        return f.read(), path


def _table(model_dir, source, stats, seq_length):
    d = stats["layer_distances"]
    lines = [f"model: {model_dir}",
             f"text: {source}",
             f"tokens: {stats['tokens']} ({stats['sequences']} sequences x {seq_length})",
             "",
             f"{'layer':>5}  {'d_l':>8}"]
    for i, value in enumerate(d, start=1):
        mark = "  <- final layer (jump)" if i == len(d) else ""
        lines.append(f"{i:>5}  {value:8.4f}{mark}")
    lines.append("")
    if stats["jump_strength"] is None:
        lines.append("jump strength: undefined (needs at least 2 layers)")
    else:
        earlier = sum(d[:-1]) / (len(d) - 1)
        lines.append(f"jump strength J = d_L / mean(d_1..d_L-1) = {d[-1]:.4f} / {earlier:.4f} "
                     f"= {stats['jump_strength']:.3f}")
    return "\n".join(lines)


def main(args) -> int:
    import json
    import os

    from ..analysis.hf_probe import ProbeError, analyze, load_causal_lm, max_positions, text_to_sequences

    def fail(message):
        print(f"jump-strength: error: {message}", file=sys.stderr)
        return 2

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar is noise next to a table or a JSON line
    if args.text_file is not None and not os.path.isfile(args.text_file):
        return fail(f"--text-file {args.text_file!r} not found")
    try:
        model, tokenizer = load_causal_lm(args.hf, device=args.device, dtype=args.dtype)
        if tokenizer is None:
            return fail(f"{args.hf!r} has no tokenizer (tokenizer.json / tokenizer.model / ...); pass a model "
                        "directory that contains its tokenizer")
        limit = max_positions(model)
        if limit is not None and args.seq_length > limit:
            return fail(f"--seq-length {args.seq_length} exceeds the model's {limit} positions")
        text, source = _read_text(args.text_file)
        ids = text_to_sequences(text, tokenizer, args.seq_length, args.max_sequences)
        vocab = model.get_input_embeddings().num_embeddings
        if int(ids.max()) >= vocab:
            return fail(f"the tokenizer produced token id {int(ids.max())} but the model has only {vocab} "
                        "embedding rows: the tokenizer does not belong to this model")
        stats = analyze(model, ids, batch_size=args.batch_size)
    except ProbeError as e:
        return fail(str(e))
    if args.json:
        print(json.dumps({"model": args.hf, "layers": stats["layers"], "layer_distances": stats["layer_distances"],
                          "jump_strength": stats["jump_strength"], "tokens": stats["tokens"],
                          "sequences": stats["sequences"], "seq_length": args.seq_length, "text": source}))
    else:
        print(_table(args.hf, source, stats, args.seq_length))
    return 0
