"""Issue 23 item 2: a GPU without TE or apex trains with torch's AdamW inside the distributed optimizer, whose
resume megatron-core 0.16.1 breaks (``KeyError: 'step'``). The fix must reach that path, not only the CPU shims."""

import pytest

from trainer_utils import assert_same_training, train


def _train(*flags, cache):
    train("--use-distributed-optimizer", "--lr-warmup-iters", "0", *flags, cache=cache, shim="no_cpu_optimizer_fix.py")


@pytest.mark.parametrize("fmt", [[], ["--dist-ckpt-optim-fully-reshardable"]], ids=["dp_reshardable", "fully_reshardable"])
def test_the_distributed_optimizer_resumes_torch_adamw_state_without_the_cpu_shims(tmp_path, cache, fmt):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    _train("--train-iters", "4", "--save", full, *fmt, cache=cache)
    _train("--train-iters", "4", "--save", part, "--exit-interval", "2", *fmt, cache=cache)
    _train("--train-iters", "4", "--save", part, "--load", part, *fmt, cache=cache)
    # one process, fp32, the same kernels in the same order: the resumed steps are the same floating-point ops
    assert_same_training(full, part, 0, keys=("lm_loss", "grad_norm"))
