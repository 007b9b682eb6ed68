"""Losses against hand-computed values."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from dunet_deploy.losses import (  # noqa: E402
    EnhancedMixingLoss,
    bce_loss,
    dice_coefficient,
    dice_loss,
    enhanced_mixing_loss,
    focal_loss,
    get_loss,
)

A, G, EPS = 0.48, 1.1, 1e-7


def test_dice_hand_computed():
    p = torch.tensor([0.5, 0.5, 0.0, 1.0])
    g = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # (2 * (0.5 + 1) + 1) / ((0.25 + 0.25 + 1) + 2 + 1) = 4 / 4.5
    assert dice_coefficient(p, g).item() == pytest.approx(4 / 4.5)
    assert dice_loss(p, g).item() == pytest.approx(1 - 4 / 4.5)


def test_empty_mask_and_empty_prediction():
    z = torch.zeros(1, 1, 4, 4)
    # Smoothing makes an empty prediction of an empty mask perfect.
    assert dice_coefficient(z, z).item() == 1.0
    assert enhanced_mixing_loss(z, z).item() == pytest.approx(
        -(1 - A) * EPS**G * math.log(1 - EPS), abs=1e-9
    )
    # Empty prediction, full mask: focal = α (1-eps)^γ (-log eps) per voxel, dice = 1/(16+1).
    g = torch.ones(1, 1, 4, 4)
    expected = A * (1 - EPS) ** G * -math.log(EPS) - math.log(1 / 17)
    assert enhanced_mixing_loss(z, g).item() == pytest.approx(expected, rel=1e-5)


def test_perfect_mask_gives_near_zero_loss():
    g = (torch.rand(2, 1, 8, 8) > 0.7).float()
    assert enhanced_mixing_loss(g, g).item() == pytest.approx(0.0, abs=1e-5)
    assert dice_loss(g, g).item() == pytest.approx(0.0, abs=1e-7)
    assert bce_loss(g, g).item() == pytest.approx(0.0, abs=1e-5)


def test_random_case_matches_formula():
    torch.manual_seed(1)
    p = torch.rand(3, 1, 5, 5)
    g = (torch.rand(3, 1, 5, 5) > 0.5).float()
    terms = []
    for pi, gi in zip(p.flatten().tolist(), g.flatten().tolist()):
        if gi:
            terms.append(-A * (1 - pi) ** G * math.log(pi))
        else:
            terms.append(-(1 - A) * pi**G * math.log(1 - pi))
    fl = sum(terms) / len(terms)
    inter = float((p * g).sum())
    dc = (2 * inter + 1) / (float((p * p).sum()) + float(g.sum()) + 1)
    assert focal_loss(p, g).item() == pytest.approx(fl, rel=1e-5)
    assert enhanced_mixing_loss(p, g).item() == pytest.approx(fl - math.log(dc), rel=1e-5)
    assert EnhancedMixingLoss()(p, g).item() == pytest.approx(fl - math.log(dc), rel=1e-5)
    bce = -sum(
        math.log(pi) if gi else math.log(1 - pi)
        for pi, gi in zip(p.flatten().tolist(), g.flatten().tolist())
    ) / p.numel()
    assert bce_loss(p, g).item() == pytest.approx(bce, rel=1e-5)


@pytest.mark.parametrize("name", ["eml", "dice", "focal", "bce"])
def test_losses_have_finite_gradients_at_saturation(name):
    p = torch.tensor([0.0, 1.0, 0.5, 1.0], requires_grad=True)
    g = torch.tensor([1.0, 0.0, 1.0, 1.0])
    loss = get_loss(name)(p, g)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all()


def test_loss_decreases_as_prediction_improves():
    g = torch.tensor([1.0, 1.0, 0.0, 0.0])
    worse = enhanced_mixing_loss(torch.tensor([0.4, 0.4, 0.6, 0.6]), g)
    better = enhanced_mixing_loss(torch.tensor([0.6, 0.6, 0.4, 0.4]), g)
    assert better < worse


def test_shape_mismatch_and_unknown_loss():
    with pytest.raises(ValueError, match="differ"):
        dice_loss(torch.zeros(2, 2), torch.zeros(4))
    with pytest.raises(KeyError, match="unknown loss"):
        get_loss("l2")
