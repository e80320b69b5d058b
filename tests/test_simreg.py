"""SimReg: naive vs blockwise vs a hand-written loop, gradients, chunking, edge cases."""

import math

import pytest
import torch

import megatron_simreg as ms
from megatron_simreg.losses import simreg_blockwise


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # Blocks smaller than the test sequences, and not dividing them, so the
    # blockwise path really walks several blocks (and chunk boundaries).
    monkeypatch.setattr(simreg_blockwise, "DEFAULT_BLOCK_SIZE", 7)


def loop_reference(hidden, labels, loss_mask=None, temperature=0.1, chunk_size=None, ignore_index=-100,
                   documents=None):
    """The definition, written as literally as possible in Python floats.

    ``documents``: per row, a list of each position's document; keys then only come from the anchor's document.
    """
    b, s, _ = hidden.shape
    z = [[hidden[i, t].double() / max(hidden[i, t].double().norm().item(), 1e-8) for t in range(s)] for i in range(b)]
    total, count, per_token = 0.0, 0, torch.zeros(b, s, dtype=torch.float64)
    for i in range(b):
        valid = [labels[i, t].item() != ignore_index and (loss_mask is None or loss_mask[i, t].item() == 1)
                 for t in range(s)]
        for a in range(s):
            if not valid[a]:
                continue
            keys = [j for j in range(s) if valid[j] and j != a
                    and (chunk_size is None or j // chunk_size == a // chunk_size)
                    and (documents is None or documents[i][j] == documents[i][a])]
            pos = [j for j in keys if labels[i, j].item() == labels[i, a].item()]
            if not pos:
                continue
            sims = {j: (z[i][a] @ z[i][j]).item() / temperature for j in keys}
            denom = sum(math.exp(sims[j]) for j in keys)
            loss = -sum(math.log(math.exp(sims[p]) / denom) for p in pos) / len(pos)
            per_token[i, a] = loss
            total += loss
            count += 1
    return total, count, per_token


def make(b=2, s=23, h=8, classes=4, dtype=torch.float64, seed=0, mask_p=0.25):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, h, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, classes, (b, s), generator=g)
    labels[0, 3] = -100
    mask = (torch.rand(b, s, generator=g) > mask_p).float()
    return hidden, labels, mask


@pytest.mark.parametrize("chunk_size", [None, 5, 8])
@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_matches_hand_computed(chunk_size, temperature):
    hidden, labels, mask = make()
    total, count, per_token = loop_reference(hidden, labels, mask, temperature, chunk_size)
    assert count > 0
    for impl in ("naive", "blockwise"):
        kw = dict(temperature=temperature, chunk_size=chunk_size, impl=impl)
        mean = ms.simreg_loss(hidden, labels, mask, **kw)
        assert abs(mean.item() - total / count) <= 1e-10 * abs(total / count)
        assert abs(ms.simreg_loss(hidden, labels, mask, reduction="sum", **kw).item() - total) <= 1e-10 * abs(total)
        none = ms.simreg_loss(hidden, labels, mask, reduction="none", **kw)
        assert none.shape == (2, 23)
        torch.testing.assert_close(none, per_token, rtol=1e-10, atol=1e-12)
        terms = ms.simreg_terms(hidden, labels, mask, **kw)
        assert terms.num_anchors.item() == count


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk_size", [None, 6])
def test_naive_vs_blockwise_values_and_grads(dtype, tol, chunk_size):
    hidden, labels, mask = make(b=3, s=40, h=16, classes=6, dtype=dtype, seed=1)
    outs = {}
    for impl in ("naive", "blockwise"):
        h = hidden.clone().requires_grad_()
        loss = ms.simreg_loss(h, labels, mask, chunk_size=chunk_size, impl=impl)
        loss.backward()
        outs[impl] = (loss.detach(), h.grad)
    (ln, gn), (lb, gb) = outs["naive"], outs["blockwise"]
    assert ln.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert abs(ln - lb) <= tol * abs(ln)
    assert (gn - gb).norm() <= tol * gn.norm()


@pytest.mark.parametrize("impl", ["naive", "blockwise"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_gradcheck(impl, chunk_size):
    hidden, labels, mask = make(b=2, s=13, h=5, classes=3, seed=2)
    hidden.requires_grad_()
    fn = lambda h: ms.simreg_loss(h, labels, mask, chunk_size=chunk_size, impl=impl, temperature=0.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden,), eps=1e-6, atol=1e-7)
    fn_none = lambda h: ms.simreg_loss(h, labels, mask, chunk_size=chunk_size, impl=impl, reduction="none")  # noqa: E731
    assert torch.autograd.gradcheck(fn_none, (hidden,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", ["naive", "blockwise"])
def test_chunked_equals_per_chunk_naive(impl):
    hidden, labels, mask = make(b=2, s=30, h=8, seed=3)
    chunk = 8
    terms = ms.simreg_terms(hidden, labels, mask, chunk_size=chunk, impl=impl)
    total, count = 0.0, 0
    for c0 in range(0, 30, chunk):
        t = ms.simreg_terms(hidden[:, c0:c0 + chunk], labels[:, c0:c0 + chunk], mask[:, c0:c0 + chunk], impl="naive")
        torch.testing.assert_close(terms.per_token[:, c0:c0 + chunk], t.per_token, rtol=1e-12, atol=1e-12)
        total += t.loss_sum.item()
        count += t.num_anchors.item()
    assert count == terms.num_anchors.item()
    assert abs(ms.simreg_loss(hidden, labels, mask, chunk_size=chunk, impl=impl).item() - total / count) < 1e-12


@pytest.mark.parametrize("impl", ["naive", "blockwise"])
def test_no_positives_is_exact_zero_with_zero_grad(impl):
    hidden = torch.randn(2, 10, 4, requires_grad=True)
    labels = torch.arange(20).view(2, 10)  # every label unique in its sequence
    loss = ms.simreg_loss(hidden, labels, impl=impl)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert ms.simreg_terms(hidden, labels, impl=impl).num_anchors.item() == 0
    # a single valid token, or a fully masked batch, has no anchor either
    mask = torch.zeros(2, 10)
    assert ms.simreg_loss(hidden, torch.zeros(2, 10, dtype=torch.long), mask, impl=impl).item() == 0.0


@pytest.mark.parametrize("impl", ["naive", "blockwise"])
def test_all_identical_labels(impl):
    # One label everywhere makes P(i) == A(i); with identical states every
    # similarity is 1/tau, so l_i = log|A(i)| = log(s - 1) exactly.
    s = 9
    hidden = torch.ones(1, s, 4, dtype=torch.float64)
    labels = torch.full((1, s), 5)
    loss = ms.simreg_loss(hidden, labels, impl=impl)
    assert abs(loss.item() - math.log(s - 1)) < 1e-12


@pytest.mark.parametrize("impl", ["naive", "blockwise"])
def test_masked_tokens_change_nothing(impl):
    hidden, labels, _ = make(b=1, s=20, seed=4)
    mask = torch.ones(1, 20)
    mask[0, 5:9] = 0
    a = ms.simreg_loss(hidden, labels, mask, impl=impl)
    kept = mask[0].bool()
    b = ms.simreg_loss(hidden[:, kept], labels[:, kept], impl=impl)
    # Masking is by position, so removing the masked tokens gives the same loss.
    assert abs(a.item() - b.item()) < 1e-12
    # bool masks and ignore_index act like a float 0/1 mask
    assert ms.simreg_loss(hidden, labels, mask.bool(), impl=impl).item() == a.item()
    labels_ign = labels.clone()
    labels_ign[0, 5:9] = -100
    assert ms.simreg_loss(hidden, labels_ign, impl=impl).item() == a.item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_fp32(dtype):
    hidden, labels, mask = make(b=2, s=30, h=16, seed=5)
    ref = ms.simreg_loss(hidden.to(dtype).double(), labels, mask, impl="naive")
    for impl in ("naive", "blockwise"):
        h = hidden.to(dtype).requires_grad_()
        loss = ms.simreg_loss(h, labels, mask, impl=impl)
        assert loss.dtype == torch.float32
        assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item())
        loss.backward()
        assert h.grad.dtype == dtype and torch.isfinite(h.grad.float()).all()


def test_deterministic():
    hidden, labels, mask = make(b=2, s=40, h=16, dtype=torch.float32, seed=6)
    for impl in ("naive", "blockwise"):
        runs = []
        for _ in range(2):
            h = hidden.clone().requires_grad_()
            loss = ms.simreg_loss(h, labels, mask, impl=impl)
            loss.backward()
            runs.append((loss.detach(), h.grad))
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_auto_switches_to_blockwise(monkeypatch):
    from megatron_simreg.losses import simreg as simreg_mod

    called = []
    real = simreg_mod.blockwise_simreg
    monkeypatch.setattr(simreg_mod, "blockwise_simreg", lambda *a, **k: called.append(1) or real(*a, **k))
    hidden, labels, _ = make(b=1, s=12, seed=7)
    ms.simreg_loss(hidden, labels)
    assert not called
    monkeypatch.setattr(simreg_mod, "AUTO_BLOCKWISE_MIN_KEYS", 12)
    ms.simreg_loss(hidden, labels)
    assert called


def test_explicit_keys_and_positions_match_full_sequence():
    """Anchors from a shard, keys from the whole sequence (what distributed exact mode does)."""
    hidden, labels, mask = make(b=2, s=24, h=8, seed=8)
    z = torch.nn.functional.normalize(hidden, dim=-1)
    valid = (labels != -100) & (mask == 1)
    full = ms.simreg_per_token(z, labels, valid, temperature=0.1, chunk_size=5, impl="naive")
    pos = torch.tensor([0, 1, 2, 3, 4, 5, 18, 19, 20, 21, 22, 23])  # a zigzag-like shard
    for impl in ("naive", "blockwise"):
        part = ms.simreg_per_token(z[:, pos], labels[:, pos], valid[:, pos], temperature=0.1, chunk_size=5, impl=impl,
                                   keys=(z, labels, valid), q_positions=pos)
        torch.testing.assert_close(part.per_token, full.per_token[:, pos], rtol=1e-12, atol=1e-12)
        assert torch.equal(part.anchors, full.anchors[:, pos])


def test_raw_states_with_separate_keys_match_naive():
    """``norm_eps``: raw states normalized inside, anchors from a shard and keys from the whole sequence.

    The leaf reaches the loss both as anchors and as keys, so the gradient checks the normalization's
    backward on both paths; one state is zero (clamped by eps).
    """
    hidden, labels, mask = make(b=2, s=24, h=8, seed=11)
    hidden[1, 4] = 0.0
    valid = (labels != -100) & (mask == 1)
    pos = torch.tensor([0, 1, 2, 3, 4, 5, 18, 19, 20, 21, 22, 23])
    w = torch.randn(2, len(pos), dtype=hidden.dtype, generator=torch.Generator().manual_seed(0))
    out = {}
    for impl in ("naive", "blockwise"):
        h = hidden.clone().requires_grad_()
        t = ms.simreg_per_token(h[:, pos], labels[:, pos], valid[:, pos], temperature=0.1, chunk_size=5, impl=impl,
                                keys=(h, labels, valid), q_positions=pos, norm_eps=1e-8)
        (t.per_token * w).sum().backward()
        out[impl] = (t.per_token.detach(), t.anchors, h.grad)
    torch.testing.assert_close(out["blockwise"][0], out["naive"][0], rtol=1e-12, atol=1e-12)
    assert torch.equal(out["blockwise"][1], out["naive"][1]) and out["naive"][1].any()
    torch.testing.assert_close(out["blockwise"][2], out["naive"][2], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_count_anchors_matches_brute_force(seed):
    from megatron_simreg.losses.simreg import count_anchors

    g = torch.Generator().manual_seed(seed)
    b, s = 3, 40
    labels = torch.randint(0, 6, (b, s), generator=g)
    labels[0, :5] = 2**31 - 1  # large label ids keep their own key
    valid = torch.rand(b, s, generator=g) > 0.3
    valid[2] = False  # a row without any valid token
    segments = torch.arange(s) // 7
    same = (labels[:, :, None] == labels[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    same &= (segments[:, None] == segments[None, :]) & ~torch.eye(s, dtype=torch.bool)
    counted = count_anchors(labels, valid, segments)
    assert counted.dtype == torch.int64 and counted.dim() == 0
    assert counted.item() == int(same.any(-1).sum()) > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=2.5), "chunk_size"),
        (dict(reduction="avg"), "reduction"),
        (dict(impl="cuda"), "impl"),
        (dict(vocab_size=3), "labels must lie"),
    ],
)
def test_bad_arguments(kwargs, match):
    hidden, labels, mask = make(b=1, s=8, seed=9)
    with pytest.raises(ValueError, match=match):
        ms.simreg_loss(hidden, labels, mask, **kwargs)


def test_bad_inputs():
    h = torch.randn(2, 8, 4)
    y = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"hidden must be .*\[b, s, h\]"):
        ms.simreg_loss(h[0], y)
    with pytest.raises(ValueError, match="hidden must be"):
        ms.simreg_loss(h.long(), y)
    with pytest.raises(ValueError, match="non-empty"):
        ms.simreg_loss(torch.randn(2, 0, 4), torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \[b, s\]"):
        ms.simreg_loss(h, y[:, :5])
    with pytest.raises(ValueError, match="labels must be an integer"):
        ms.simreg_loss(h, y.float())
    with pytest.raises(ValueError, match="loss_mask"):
        ms.simreg_loss(h, y, torch.ones(8, 2))
    with pytest.raises(ValueError, match="labels must lie"):
        ms.simreg_loss(h, y - 5)
    h[0, 0, 0] = float("nan")
    ms.simreg_loss(h, y)  # NaN checks are opt-in: no error, no sync
    with pytest.raises(ValueError, match="NaN"):
        ms.simreg_loss(h, y, debug=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weight=-0.1), "weight"),
        (dict(temperature=0), "temperature"),
        (dict(chunk_size=-4), "chunk_size"),
        (dict(representation="mid"), "representation"),
        (dict(mode="global"), "mode"),
        (dict(impl="fast"), "impl"),
    ],
)
def test_simreg_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ms.SimRegConfig(**kwargs)


def test_zero_state_gradient_matches_naive():
    # A zero hidden state is clamped by eps in the normalization; both paths must agree there too.
    hidden, labels, mask = make(b=1, s=12, h=4, seed=10)
    hidden[0, 3] = 0.0
    grads = []
    for impl in ("naive", "blockwise"):
        h = hidden.clone().requires_grad_()
        ms.simreg_loss(h, labels, mask, impl=impl, temperature=0.5).backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)


def _largest_allocation(impl, s, h=16):
    """The largest single CPU allocation (bytes) of SimReg's forward and backward at sequence length ``s``."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, s, h, generator=gen, requires_grad=True)
    labels = torch.randint(0, s // 8, (1, s), generator=gen)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        ms.simreg_loss(hidden, labels, impl=impl).backward()
    return max(e.cpu_memory_usage for e in prof.events())


def test_blockwise_never_holds_an_s_by_s_matrix():
    """The README's claim, measured: at s = 4096 an ``s x s`` fp32 matrix is 64 MiB. Blockwise's largest allocation is
    one ``[block, s]`` tile (256 x 4096, 8 MiB measured: its widest elements are 8 B), well under a quarter of that,
    and it does not grow with s beyond the tile's width. The naive path, which does hold ``s x s`` similarities (128 MiB
    measured), shows that the measurement sees such a matrix."""
    s = 4096
    full = s * s * 4
    assert _largest_allocation("naive", s) >= full
    assert _largest_allocation("blockwise", s) < full // 4
