"""Stage 1: consistency distillation of the CFG teacher into a velocity model (the generator's init).

APT (arXiv 2501.08316 §3.2) initialises the one-step generator G(z, c) = z - G^(z, c, T) by
distilling the teacher, CFG baked in, with an MSE loss. Discrete-time consistency distillation
(Song et al. 2023; LCM, arXiv 2310.04378) on the teacher's Euler trajectory t_0 = 0 < ... < t_N = 1:

    x_n      = (1 - t_n) x0 + t_n eps                         data point noised to t_n
    x_{n-1}  = x_n + (t_{n-1} - t_n) v_cfg(x_n, t_n, c)        one teacher Euler step with CFG
    f(x, t)  = x - t v_student(x, t)                           the student's clean-sample estimate
    target   = f_sg(x_{n-1}, t_{n-1})   (= x_{n-1} when t_{n-1} = 0)
    loss     = || v_student(x_n, t_n) - (x_n - target) / t_n ||^2

The target network is the student itself without gradient (iCT, arXiv 2310.14189, finds an EMA target
unnecessary); the EMA student is the product. At n = N the input is pure noise, so the student learns
exactly the one-step map z -> G(z, c) the APT stage starts from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from apt.config import DistillConfig
from apt.flow import guided_velocity, timestep_schedule
from apt.models.backbone import TextCond


def distillation_timesteps(d: DistillConfig, device=None) -> torch.Tensor:
    """t_0 = 0 < t_1 < ... < t_N = 1: the sampler's schedule (``distill.num_steps``, ``distill.shift``), increasing."""
    return timestep_schedule(d.num_steps, shift=d.shift, device=device).flip(0)


def consistency_loss(student: nn.Module, teacher: nn.Module, x0: torch.Tensor, text: TextCond, negative: TextCond, *,
                     ts: torch.Tensor, rng: torch.Generator, d: DistillConfig) -> torch.Tensor:
    """The consistency-distillation loss of ``student`` on one batch of clean clips ``x0`` (B, C, T, H, W).

    ``negative`` is the text of ``distill.negative_prompt`` (CFG's other branch); ``ts`` the grid of
    ``distillation_timesteps``. Random draws come from ``rng`` in a fixed order (exact resume)."""
    B, N, device = x0.shape[0], d.num_steps, x0.device
    tb = lambda t: t.view(-1, 1, 1, 1, 1)  # noqa: E731
    # 1. A point on the forward path at a random discrete t_n, n in 1..N.
    n = torch.randint(1, N + 1, (B,), generator=rng).to(device)
    t_n, t_prev = ts[n], ts[n - 1]
    eps = torch.randn(*x0.shape, generator=rng).to(device)
    x_n = (1 - tb(t_n)) * x0 + tb(t_n) * eps
    with torch.no_grad():
        # 2. One teacher Euler step with CFG baked in (APT: scale 7.5 and a fixed negative prompt).
        x_prev = x_n + tb(t_prev - t_n) * guided_velocity(teacher, x_n, t_n, text, negative, d.cfg_scale)
        # 3. Bootstrapped target: the student's own clean-sample estimate one step earlier.
        target = x_prev - tb(t_prev) * student(x_prev, t_prev, text)
    # 4. Velocity MSE against the velocity that would land on the target from x_n; the one-step term (n = N) weighted.
    v = student(x_n, t_n, text)
    v_target = (x_n - target) / tb(t_n)
    weights = torch.where(n == N, d.final_step_weight, 1.0).to(v.dtype)
    return (F.mse_loss(v, v_target, reduction="none").flatten(1).mean(1) * weights).mean()
