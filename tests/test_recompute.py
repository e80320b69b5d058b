"""Megatron-LM's activation-recompute flags: validated like Megatron-LM, passed into the TransformerConfig, and
training with SimReg and JREG under full recompute logs the same losses as without it."""

import pytest

import megatron.core  # noqa: E402,F401  (a hard import: a broken install must fail, not skip)

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

    from megatron_simreg.training.model_setup import build_model

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


def test_training_under_full_recompute_logs_the_same_losses(tmp_path, cache):
    """Later steps' losses depend on earlier gradients: JREG's and pre_norm SimReg's must survive full recompute."""
    from trainer_utils import metrics, train

    reg = ["--simreg-weight", "0.1", "--simreg-representation", "pre_norm", "--jreg-weight", "1.0",
           "--jreg-weighting", "layer_weighted", "--train-iters", "3"]
    plain, recomputed = str(tmp_path / "plain"), str(tmp_path / "recompute")
    train(*reg, "--save", plain, cache=cache)
    train(*reg, "--save", recomputed, "--recompute-granularity", "full", "--recompute-method", "uniform",
          "--recompute-num-layers", "2", cache=cache)
    for a, b in zip(metrics(plain), metrics(recomputed), strict=True):
        for key in ("lm_loss", "simreg_loss", "jreg_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)
