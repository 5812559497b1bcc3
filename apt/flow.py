"""Rectified flow: noising, velocity target, timestep shift and sampling, Euler sampler with CFG.

Convention (docs/design.md §1): x_t = (1 - t) x0 + t eps, v = eps - x0, t in [0, 1], t = 1 is noise.
Timestep shift (SD3, arXiv 2403.03206 §5.3.2): shift(t, s) = s t / (1 + (s - 1) t).
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from apt.models.backbone import TextCond

VelocityFn = Callable[[torch.Tensor, torch.Tensor, TextCond], torch.Tensor]


def _bcast(t_B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t_B.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps."""
    t = _bcast(t_B, x0)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = eps - x0 (constant along the straight path)."""
    return eps - x0


def shift_timestep(t: torch.Tensor, shift: float) -> torch.Tensor:
    """shift(t, s) = s t / (1 + (s - 1) t); s > 1 moves mass towards noise, s = 1 is the identity."""
    if shift <= 0:
        raise ValueError(f"timestep shift must be positive, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(n: int, *, shift: float = 1.0, distribution: str = "uniform", generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Draw n training timesteps: uniform or logit-normal (SD3) on (0, 1), then shifted."""
    if distribution == "uniform":
        u = torch.rand(n, generator=generator, device=device)
    elif distribution == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"unknown timestep distribution {distribution!r} (uniform | logit_normal)")
    return shift_timestep(u, shift)


def timestep_schedule(steps: int, *, shift: float = 1.0, device=None) -> torch.Tensor:
    """steps + 1 decreasing timesteps from 1 to 0 (uniform in the unshifted time, then shifted)."""
    if steps < 1:
        raise ValueError(f"number of sampling steps must be >= 1, got {steps}")
    return shift_timestep(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def guided_velocity(model: VelocityFn, x_t: torch.Tensor, t_B: torch.Tensor, text: TextCond, negative: TextCond | None, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance: v_neg + s (v_cond - v_neg); both passes batched into one call."""
    if negative is None or cfg_scale == 1.0:
        return model(x_t, t_B, text)
    B = x_t.shape[0]
    both = TextCond.cat([text, negative])
    v = model(torch.cat([x_t, x_t]), torch.cat([t_B, t_B]), both)
    v_cond, v_neg = v[:B], v[B:]
    return v_neg + cfg_scale * (v_cond - v_neg)


@torch.no_grad()
def euler_sample(
    model: VelocityFn,
    noise: torch.Tensor,
    text: TextCond,
    *,
    steps: int,
    shift: float = 1.0,
    negative: TextCond | None = None,
    cfg_scale: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate dx/dt = v from t=1 (noise) to t=0 with Euler steps; returns x0.

    With steps=1 and no CFG this is the one-step generator G(z, c) = z - v(z, c, 1).
    """
    ts = timestep_schedule(steps, shift=shift, device=noise.device)
    x = noise
    for i in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
        t_B = ts[i].expand(x.shape[0])
        v = guided_velocity(model, x, t_B, text, negative, cfg_scale)
        x = x + _bcast(ts[i + 1] - ts[i], x) * v
    return x
