"""Megatron-LM's activation-recompute flags: validated like Megatron-LM, and passed into the TransformerConfig."""

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_utils import run_distributed  # noqa: E402

from megatron_simreg.training.args import parse_train_args  # noqa: E402

BASE = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--train-iters", "2", "--jreg-weight", "1.0"]


@pytest.mark.parametrize("flags, message", [
    (["--recompute-granularity", "full"], "needs --recompute-method"),
    (["--recompute-granularity", "full", "--recompute-method", "block"], "needs --recompute-method"),
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "3",
      "--pipeline-model-parallel-size", "2"], "between 1 and the layers per pipeline stage"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "3"],
     "divide the layers per pipeline stage"),
    (["--recompute-granularity", "selective", "--recompute-method", "uniform"], "selective recompute takes neither"),
    (["--recompute-num-layers", "1"], "go with --recompute-granularity full"),
])
def test_bad_recompute_flags_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_train_args(BASE + flags)
    assert message in capsys.readouterr().err


def _built_config(rank, world, flags):
    from megatron.core import parallel_state as ps

    from megatron_simreg.training.trainer import build_model

    ps.initialize_model_parallel()
    _, config = build_model(parse_train_args(BASE + flags), 128)
    return config.recompute_granularity, config.recompute_method, config.recompute_num_layers


@pytest.mark.parametrize("flags, expected", [
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "2"],
     ("full", "uniform", 2)),
    (["--recompute-granularity", "selective"], ("selective", None, None)),
    ([], (None, None, None)),
])
def test_recompute_flags_reach_the_transformer_config(flags, expected):
    assert run_distributed(_built_config, 1, args=(flags,), timeout=120)[0] == expected
