"""Per-rank checkpoint files are read with ``torch.load(weights_only=True)`` (issue 15): the RNG states the
trainer writes round-trip that way, and a file holding any other pickled object is refused, not run."""

import random

import numpy as np
import pytest
import torch

from megatron_simreg.conversion.megatron_side import SingleProcessMegatron
from megatron_simreg.training import checkpoint as ckpt

UNPICKLED = []


def _record_unpickling():
    """What unpickling a :class:`_Payload` runs; a real attack would name ``os.system`` here."""
    UNPICKLED.append(True)
    return "payload"


class _Payload:
    def __reduce__(self):
        return (_record_unpickling, ())


def _draws():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracked = torch.rand(3).tolist()
    return random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist(), tracked


def _leaves(x):
    if isinstance(x, dict):
        return [leaf for v in x.values() for leaf in _leaves(v)]
    if isinstance(x, (list, tuple)):
        return [leaf for v in x for leaf in _leaves(v)]
    return [x]


def test_rng_file_round_trips_through_a_weights_only_load(tmp_path):
    with SingleProcessMegatron():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(7)
        random.seed(1)
        np.random.seed(2)
        np.random.randn()  # NumPy now holds a cached Gaussian, part of its state
        state = ckpt.rng_state()
        # nothing a weights_only load needs an allow-list for (megatron-core allow-lists numpy's array globals
        # process-wide on import; the file must not depend on that)
        assert all(isinstance(v, (torch.Tensor, int, float, str, type(None))) for v in _leaves(state)), \
            sorted({type(v).__name__ for v in _leaves(state)})
        path = tmp_path / "rng_00000.pt"
        torch.save(state, path)
        expected = _draws()
        _draws()  # move every generator on
        ckpt.set_rng_state(ckpt.load_rank_file(str(path)))
        assert _draws() == expected


def test_a_file_holding_another_pickled_object_is_refused_unrun(tmp_path):
    path = tmp_path / "rng_00000.pt"
    torch.save({"random_rng_state": _Payload()}, path)
    UNPICKLED.clear()
    with pytest.raises(ckpt.CheckpointError, match=r"refusing to read .*rng_00000\.pt.*_record_unpickling"):
        ckpt.load_rank_file(str(path))
    assert not UNPICKLED


def test_a_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "rng_00000.pt"
    torch.save({"torch_rng_state": torch.get_rng_state()}, path)
    path.write_bytes(path.read_bytes()[:64])
    with pytest.raises(ckpt.CheckpointError, match="corrupt or incomplete"):
        ckpt.load_rank_file(str(path))
