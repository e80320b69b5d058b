"""Analysis helpers: tokens-to-target interpolation, speed-up, representation statistics."""

import pytest
import torch

from megatron_simreg.analysis.convergence import speedup, tokens_to_target
from megatron_simreg.analysis.representations import classification_margins, label_cosine_similarity


def test_tokens_to_target_interpolates_the_first_crossing():
    tokens, losses = [100, 200, 300, 400], [4.0, 3.0, 2.0, 2.5]
    assert tokens_to_target(tokens, losses, 2.5) == pytest.approx(250.0)
    assert tokens_to_target(tokens, losses, 4.0) == 100.0
    assert tokens_to_target(tokens, losses, 1.0) is None
    assert speedup(250.0, 400.0) == pytest.approx(0.375)
    assert speedup(None, 400.0) is None


def test_label_cosine_similarity_and_margins():
    h = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]])
    labels = torch.tensor([[7, 7, 3]])
    intra, inter = label_cosine_similarity(h, labels)
    assert intra == pytest.approx(1.0 / (1.01 ** 0.5), rel=1e-5)
    assert inter == pytest.approx((0.0 + 0.1 / (1.01 ** 0.5)) / 2, rel=1e-5)
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0]])
    assert classification_margins(logits, torch.tensor([0, 2])).tolist() == [1.0, -2.0]
