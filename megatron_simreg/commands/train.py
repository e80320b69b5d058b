"""``megatron-simreg train``: see :mod:`megatron_simreg.training`."""


def add_arguments(p):
    from ..training.args import add_arguments as add

    add(p)


def run_argv(argv) -> int:
    """Parsed here rather than by the top-level parser: ``--config`` must sit under the explicit flags."""
    from ..training.args import parse_train_args
    from ..training.launch import launch

    return launch(parse_train_args(argv), argv)
