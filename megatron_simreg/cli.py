"""The ``megatron-simreg`` console script.

Each subcommand lives in its own module of :mod:`megatron_simreg.commands`, which exposes
``add_arguments(parser)`` and ``main(args) -> int`` (or ``run_argv(argv)``
when it parses its own flags) and keeps its heavy
imports (Megatron, DeepSpeed, transformers) inside ``main`` so that
``--help`` stays fast and one command's missing optional dependency does not
break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = "SimReg and JREG for Megatron-core pretraining: train, convert to and from Hugging Face, compare, submit."
# name -> (module, one-line help, plain text: argparse prints it as is)
_C = "megatron_simreg.commands."
COMMANDS = {
    "demo": (_C + "demo", "CPU demo: a tiny GPT trained with and without SimReg, with a report"),
    "train": (_C + "train", "pretrain a GPTModel (Megatron-LM flags, --config YAML)"),
    "env": (_C + "env", "versions, CUDA, TransformerEngine and NVIDIA apex"),
    "export-hf": (_C + "export_hf", "checkpoint -> Hugging Face Llama, Qwen2, Qwen3, Mixtral or Qwen3-MoE (an "
                  "imported Mistral exports as Llama), --verify parity"),
    "import-hf": (_C + "import_hf", "Hugging Face Llama, Mistral, Qwen2, Qwen3, Mixtral or Qwen3-MoE -> checkpoint "
                  "for train --load"),
    "submit": (_C + "submit", "submit train to SLURM: multi-node, preemption-safe auto-resume"),
    "status": (_C + "status", "a submitted run's SLURM state, last iteration and metrics"),
    "compare": (_C + "compare", "baseline vs SimReg vs JREG over models and seeds: runs, evaluation, "
                "report"),
    "jump-strength": (_C + "jump_strength", "HF causal LM: layer angular distances, JREG jump strength"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-simreg", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    from . import known_warnings

    known_warnings.install()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        if hasattr(module, "run_argv"):  # the command parses its own flags
            return module.run_argv(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return importlib.import_module(args._module).main(args)


if __name__ == "__main__":
    sys.exit(main())
