"""What the two backends hand to megatron-core, checked without a process group (issue 14 items 6 and 9).

Context parallelism cannot train on CPU (its attention needs TransformerEngine),
so these tests fake a CP world size of 2 and look at what the backends pass on.
"""

from argparse import Namespace
from types import SimpleNamespace

import pytest
import torch

from megatron_simreg.training import backends

SEQ, CP, MICRO = 32, 2, 2


class _Group:
    def __init__(self, size):
        self._size = size

    def size(self):
        return self._size


def _local_microbatches(n):
    """``n`` micro-batches as a CP rank holds them: ``SEQ / CP`` positions each."""
    s = SEQ // CP
    return [{"tokens": torch.zeros(MICRO, s, dtype=torch.long), "labels": torch.zeros(MICRO, s, dtype=torch.long),
             "loss_mask": torch.ones(MICRO, s), "position_ids": torch.arange(s).expand(MICRO, -1)} for _ in range(n)]


@pytest.mark.parametrize("sequence_parallel,tp", [(False, 1), (True, 2)], ids=["cp2", "cp2-tp2-sp"])
def test_pipeline_messages_have_the_cp_local_sequence_length(monkeypatch, sequence_parallel, tp):
    """Item 6: the schedule divides ``seq_length`` by CP itself, so it must get the full length.

    The pipeline schedule's p2p buffers (``get_tensor_shapes``) must match the
    activations a stage sends: ``[s / cp (/ tp with SP), micro_batch, hidden]``.
    Passing the CP-local length made them ``s / cp**2``.
    """
    from megatron.core.pipeline_parallel import schedules

    captured = {}

    def get_forward_backward_func():
        def schedule(**kwargs):
            captured.update(kwargs)
            return []
        return schedule

    monkeypatch.setattr("megatron.core.pipeline_parallel.get_forward_backward_func", get_forward_backward_func)
    monkeypatch.setattr(backends, "_global_sums", lambda local: local)
    backend = backends.MegatronBackend.__new__(backends.MegatronBackend)
    backend.args, backend.model = Namespace(seq_length=SEQ), object()
    microbatches = _local_microbatches(2)
    backend._run(microbatches, forward_only=True)

    config = SimpleNamespace(sequence_parallel=sequence_parallel, hidden_size=8)
    shapes = schedules.get_tensor_shapes(
        seq_length=captured["seq_length"], micro_batch_size=captured["micro_batch_size"], decoder_seq_length=None,
        config=config, tp_group=_Group(tp), cp_group=_Group(CP))
    local = microbatches[0]["tokens"].shape[1] // (tp if sequence_parallel else 1)
    assert shapes == [(local, MICRO, 8)]


class _FakeEngine:
    """The DeepSpeed engine calls ``DeepSpeedBackend.train_step`` makes, minus the training."""

    def train(self):
        pass

    def __call__(self, tokens, position_ids, attention_mask, labels=None, loss_mask=None):
        return torch.ones(tokens.shape, requires_grad=True)

    def backward(self, loss):
        pass

    def step(self):
        pass

    optimizer = SimpleNamespace(overflow=False)  # ZeRO's flag for a skipped (non-finite) step

    def get_global_grad_norm(self):
        return 0.0


@pytest.mark.parametrize("num_micro", [1, 4])
def test_deepspeed_moe_aux_loss_scale_follows_megatron_under_cp(monkeypatch, num_micro):
    """Item 9: megatron-core's ``forward_step`` sets MoEAuxLossAutoScaler's scale to cp / M.

    DeepSpeed averages gradients over DP x CP, and every CP rank's aux loss is
    the micro-batch's whole loss, so without the cp factor the aux-loss
    gradient is 1/cp of Megatron's. (With ``calculate_per_token_loss``
    Megatron uses 1, but this backend averages each micro-batch's loss: the
    other branch.)
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    scales = []
    monkeypatch.setattr(ps, "get_context_parallel_world_size", lambda: CP)
    monkeypatch.setattr(MoEAuxLossAutoScaler, "set_loss_scale", staticmethod(lambda scale: scales.append(scale)))
    monkeypatch.setattr(backends, "_global_sums", lambda local: local)
    backend = backends.DeepSpeedBackend.__new__(backends.DeepSpeedBackend)
    backend.engine, backend.scheduler = _FakeEngine(), SimpleNamespace(step=lambda increment: None)
    backend.train_step(_local_microbatches(num_micro))
    assert [float(s) for s in scales] == [CP / num_micro]


def test_the_non_finite_check_allocates_nothing_the_size_of_a_grad_buffer():
    """Issue 23 item 9: ``isfinite(buffer)`` made a temporary per element (about 8 GB for an 8B model's buffers).

    The check must still see a NaN or an inf anywhere, and not call huge finite values non-finite (a 2-norm of
    3e38s overflows to inf).
    """
    from torch.profiler import ProfilerActivity, profile

    buffers = [torch.randn(1_000_000), torch.randn(250_000)]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        assert backends._all_finite(buffers)
    largest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert largest < 1024, f"the check allocated {largest} bytes at once for buffers of {4 * 1_000_000} bytes"
    for bad in (float("nan"), float("inf"), float("-inf")):
        buffers[1][123] = bad
        assert not backends._all_finite(buffers)
    assert backends._all_finite([torch.full((4,), 3e38)])
    assert not backends._all_finite(buffers[:1], local_ok=False)
