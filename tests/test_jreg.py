"""JREG on known geometry."""

import math

import pytest
import torch

import megatron_simreg as ms


def rotated(v, angle):
    """Rotate the first two coordinates of ``v`` [..., h] by ``angle``."""
    out = v.clone()
    c, s = math.cos(angle), math.sin(angle)
    out[..., 0] = c * v[..., 0] - s * v[..., 1]
    out[..., 1] = s * v[..., 0] + c * v[..., 1]
    return out


def test_known_angles():
    h0 = torch.zeros(2, 3, 4, dtype=torch.float64)
    h0[..., 0] = 1.0
    angles = [0.1, math.pi / 2, 0.3, math.pi]
    states = [h0]
    for a in angles:
        states.append(rotated(states[-1], a) * 2.0)  # scale must not matter
    d = ms.layer_angular_distances(states)
    expected = torch.tensor([0.1 / math.pi, 0.5, 0.3 / math.pi, 1.0], dtype=torch.float64)
    torch.testing.assert_close(d, expected, atol=1e-7, rtol=0)  # the clamp moves pi by ~2e-8 rad in fp64
    cos_d = ms.layer_angular_distances(states, metric="cosine")
    torch.testing.assert_close(cos_d, (1 - torch.cos(torch.tensor(angles, dtype=torch.float64))) / 2, atol=1e-12, rtol=0)


def test_parallel_states_have_finite_gradients():
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    d = ms.layer_angular_distances([x, 3 * x, -x])
    assert d[0].item() < 1e-7 and d[1].item() > 1 - 1e-7
    d.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_mask_selects_tokens():
    a = torch.zeros(1, 4, 2, dtype=torch.float64)
    a[..., 0] = 1
    b = a.clone()
    b[0, 2:] = torch.tensor([0.0, 1.0], dtype=torch.float64)  # tokens 2, 3 turn by 90 degrees
    mask = torch.tensor([[1, 1, 0, 1]])
    d = ms.layer_angular_distances([a, b], mask)
    assert abs(d.item() - 0.5 / 3) < 1e-8  # parallel pairs sit one ulp inside the clamp
    sums, count = ms.layer_distance_sums([a, b], mask)
    assert count.item() == 3 and abs(sums.item() - 0.5) < 1e-7
    assert ms.layer_angular_distances([a, b], torch.zeros(1, 4)).item() == 0.0


def test_jump_strength_and_penalty():
    d = torch.tensor([0.1, 0.1, 0.2, 0.6])
    assert abs(ms.jump_strength(d).item() - 0.6 / (0.4 / 3)) < 1e-6
    assert ms.jreg_penalty(d, "final").item() == pytest.approx(0.6)
    w = torch.tensor([1, 2, 3, 4.0]) / 10
    assert ms.jreg_penalty(d, "layer_weighted").item() == pytest.approx((w * d).sum().item())
    w2 = torch.tensor([1, 4, 9, 16.0]) / 30
    assert ms.jreg_penalty(d, "layer_weighted", power=2).item() == pytest.approx((w2 * d).sum().item())
    assert ms.layer_weights(4, "layer_weighted", 0.0).tolist() == [0.25] * 4


def test_penalty_gradient_reduces_final_jump():
    torch.manual_seed(0)
    states = [torch.randn(2, 6, 16) for _ in range(4)]
    last = states[-1].clone().requires_grad_()
    d = ms.layer_angular_distances(states[:-1] + [last])
    ms.jreg_penalty(d).backward()
    with torch.no_grad():
        stepped = last - 0.5 * last.grad / last.grad.norm()
    assert ms.layer_angular_distances(states[:-1] + [stepped])[-1] < d[-1]


def test_bf16_states():
    x = torch.randn(2, 5, 8)
    y = rotated(x, 0.5)
    d32 = ms.layer_angular_distances([x, y])
    d16 = ms.layer_angular_distances([x.bfloat16(), y.bfloat16()])
    assert d16.dtype == torch.float32 and abs(d16.item() - d32.item()) < 1e-2


def test_bad_inputs():
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="at least 2"):
        ms.layer_angular_distances([x])
    with pytest.raises(ValueError, match=r"states\[1\]"):
        ms.layer_angular_distances([x, x[:, :3]])
    with pytest.raises(ValueError, match="non-empty"):
        ms.layer_angular_distances([x[:, :0], x[:, :0]])
    with pytest.raises(ValueError, match="loss_mask"):
        ms.layer_angular_distances([x, x], torch.ones(5, 2))
    with pytest.raises(ValueError, match="metric"):
        ms.layer_angular_distances([x, x], metric="l2")
    with pytest.raises(ValueError, match="at least 2 layers"):
        ms.jump_strength(torch.tensor([0.3]))
    with pytest.raises(ValueError, match="weighting"):
        ms.jreg_penalty(torch.tensor([0.3]), "first")
    with pytest.raises(ValueError, match="weight"):
        ms.JRegConfig(weight=-1)
    with pytest.raises(ValueError, match="power"):
        ms.JRegConfig(power=-1)
    assert ms.JRegConfig().weight == 3.0
