import math

import pytest
import torch

from apt.flow import (
    add_noise,
    euler_sample,
    sample_timesteps,
    shift_timestep,
    timestep_schedule,
    velocity_target,
)
from tests.conftest import random_text


def test_noising_endpoints_and_velocity():
    x0, eps = torch.randn(3, 3, 2, 4, 4), torch.randn(3, 3, 2, 4, 4)
    assert torch.equal(add_noise(x0, eps, torch.zeros(3)), x0)
    assert torch.equal(add_noise(x0, eps, torch.ones(3)), eps)
    t = torch.rand(3)
    # d x_t / dt = eps - x0 = v, checked by a finite difference.
    h = 1e-3
    fd = (add_noise(x0, eps, t + h) - add_noise(x0, eps, t)) / h
    torch.testing.assert_close(fd, velocity_target(x0, eps), atol=1e-3, rtol=1e-3)


def test_shift_identity_monotone_and_fixed_points():
    t = torch.linspace(0, 1, 101)
    torch.testing.assert_close(shift_timestep(t, 1.0), t)
    for s in (0.5, 3.0, 12.0, 24.0):
        st = shift_timestep(t, s)
        assert torch.all(st[1:] > st[:-1])
        assert st[0] == 0 and st[-1] == 1
    assert shift_timestep(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)  # 3*0.5/(1+2*0.5)
    with pytest.raises(ValueError, match="positive"):
        shift_timestep(t, 0.0)


def test_timestep_sampling_ranges_and_errors():
    g = torch.Generator().manual_seed(0)
    for dist in ("uniform", "logit_normal"):
        t = sample_timesteps(1000, shift=3.0, distribution=dist, generator=g)
        assert t.min() >= 0 and t.max() <= 1
    # shift > 1 moves mass towards noise
    u = sample_timesteps(5000, generator=torch.Generator().manual_seed(1))
    s = sample_timesteps(5000, shift=12.0, generator=torch.Generator().manual_seed(1))
    assert s.mean() > u.mean() + 0.2
    with pytest.raises(ValueError, match="distribution"):
        sample_timesteps(3, distribution="beta")
    with pytest.raises(ValueError, match="steps"):
        timestep_schedule(0)


def test_euler_exact_for_straight_paths():
    """For a model that knows x0 (v = (x_t - x0)/t), Euler lands on x0 from any noise in any number of steps."""
    x0 = torch.randn(2, 3, 1, 4, 4)
    oracle = lambda x, t, c: (x - x0) / t.view(-1, 1, 1, 1, 1)  # noqa: E731
    z = torch.randn_like(x0)
    for steps in (1, 2, 7, 25):
        torch.testing.assert_close(euler_sample(oracle, z, random_text(2, 3, 8), steps=steps, shift=3.0), x0, atol=1e-5, rtol=1e-5)


def test_euler_cfg_combines_conditional_and_negative():
    """With constant velocities, x0 = z - (v_neg + s (v_cond - v_neg)) for any step count."""
    text, neg = random_text(2, 3, 8), random_text(2, 3, 8)
    neg.emb_BLD.zero_()

    def model(x, t, c):
        is_neg = (c.emb_BLD.abs().sum((1, 2)) == 0).float().view(-1, 1, 1, 1, 1)
        return torch.ones_like(x) * (1 - is_neg) * 2.0 + is_neg * 0.5

    z = torch.zeros(2, 3, 1, 4, 4)
    out = euler_sample(model, z, text, steps=5, negative=neg, cfg_scale=3.0)
    expected = -(0.5 + 3.0 * (2.0 - 0.5))
    torch.testing.assert_close(out, torch.full_like(z, expected))
    assert not math.isnan(out.sum().item())
