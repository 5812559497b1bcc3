import math

import torch

from apt.ema import ema_update
from apt.losses import (
    approximate_r1,
    d_loss_nonsaturating,
    flow_matching_loss,
    g_loss_nonsaturating,
    mismatch_loss,
    text_contrast_loss,
)


def sp(x: float) -> float:
    return math.log1p(math.exp(x))


def test_gan_losses_match_hand_computation():
    real, fake = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.0])
    expected_d = (sp(-0.5) + sp(1.0)) / 2 + (sp(2.0) + sp(0.0)) / 2
    assert abs(d_loss_nonsaturating(real, fake).item() - expected_d) < 1e-6
    assert abs(g_loss_nonsaturating(fake).item() - (sp(-2.0) + sp(0.0)) / 2) < 1e-6


def test_mismatch_loss_is_the_fake_term():
    mismatched = torch.tensor([1.0, -2.0])
    assert abs(mismatch_loss(mismatched).item() - (sp(1.0) + sp(-2.0)) / 2) < 1e-6


def test_text_contrast_loss_is_softplus_of_the_logit_gap():
    own, other = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 1.5])
    assert abs(text_contrast_loss(own, other).item() - (sp(-1.0) + sp(2.0)) / 2) < 1e-6


def test_approximate_r1_is_lambda_times_mean_squared_difference():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.5, 2.0, 1.0])
    assert abs(approximate_r1(a, b, weight=100.0).item() - 100.0 * (0.25 + 0 + 4) / 3) < 1e-4


def test_flow_matching_loss_spaces():
    x0, eps, t = torch.randn(4, 3, 1, 2, 2), torch.randn(4, 3, 1, 2, 2), torch.rand(4)
    v = eps - x0
    assert flow_matching_loss(v, x0, eps, t).item() == 0.0
    assert flow_matching_loss(v, x0, eps, t, space="x0").item() < 1e-12
    off = v + 1.0
    # x0 space weighs the velocity error by t^2
    expected = (t**2).mean().item()
    assert abs(flow_matching_loss(off, x0, eps, t, space="x0").item() - expected) < 1e-5


def test_ema_update_math():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    wa, wb = a.weight.detach().clone(), b.weight.detach().clone()
    ema_update(a, b, 0.9)
    torch.testing.assert_close(a.weight, 0.9 * wa + 0.1 * wb)
    for _ in range(200):
        ema_update(a, b, 0.9)
    torch.testing.assert_close(a.weight, b.weight, atol=1e-6, rtol=0)
