"""Stage 1: consistency distillation of the CFG teacher into a velocity model (generator init).

APT (arXiv 2501.08316 §3.2) initialises the one-step generator G(z, c) = z - G^(z, c, T) by
distilling the teacher, CFG baked in, with an MSE loss. We use discrete-time consistency
distillation (Song et al. 2023; LCM, arXiv 2310.04378) on the teacher's Euler trajectory:

    x_n      = (1 - t_n) x0 + t_n eps                         data point noised to t_n
    x_{n-1}  = x_n + (t_{n-1} - t_n) v_cfg(x_n, t_n, c)        one teacher Euler step with CFG
    f(x, t)  = x - t v_student(x, t)                           the student's clean-sample estimate
    target   = f_sg(x_{n-1}, t_{n-1})   (= x_{n-1} when t_{n-1} = 0)
    loss     = || v_student(x_n, t_n) - (x_n - target) / t_n ||^2

The target network is the student itself without gradient (iCT, arXiv 2310.14189, finds an EMA
target unnecessary); the EMA student (``net_ema``) is the product. At n = N the input is pure noise,
so the student learns exactly the one-step map z -> G(z, c) the APT stage starts from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from apt.config import Config
from apt.flow import guided_velocity, timestep_schedule
from apt.lit.base import EmaNetModule


class DistillModule(EmaNetModule):
    loss_label = "distillation loss"

    def __init__(self, config: Config):
        super().__init__(config)
        self.teacher = self.frozen_copy(self.load_backbone(config.distill.teacher, "net_ema"))
        self.net = self.load_backbone(config.distill.teacher, "net_ema")  # the student starts from the teacher
        self.net_ema = self.frozen_copy(self.net)
        # t_0 = 0 < t_1 < ... < t_N = 1 (the sampler's schedule, increasing).
        self.register_buffer("ts", timestep_schedule(config.distill.num_steps, shift=config.distill.shift).flip(0), persistent=False)

    def part_loss(self, batch: dict) -> torch.Tensor:
        c = self.config.distill
        x0 = batch["x"]
        B, N = x0.shape[0], c.num_steps
        text = self.encode_batch(batch)
        negative = self.encode([c.negative_prompt] * B, allow_empty=True)
        # 1. A point on the forward path at a random discrete t_n, n in 1..N.
        n = torch.randint(1, N + 1, (B,), generator=self.rng).to(self.device)
        t_n, t_prev = self.ts[n], self.ts[n - 1]
        eps = self.randn(*x0.shape)
        tb = lambda t: t.view(-1, 1, 1, 1, 1)  # noqa: E731
        x_n = (1 - tb(t_n)) * x0 + tb(t_n) * eps
        with torch.no_grad():
            # 2. One teacher Euler step with CFG baked in (APT: scale 7.5 and a fixed negative prompt).
            x_prev = x_n + tb(t_prev - t_n) * guided_velocity(self.teacher, x_n, t_n, text, negative, c.cfg_scale)
            # 3. Bootstrapped target: the student's own clean-sample estimate one step earlier.
            target = x_prev - tb(t_prev) * self.net(x_prev, t_prev, text)
        # 4. Velocity MSE against the velocity that would land on the target from x_n.
        v = self.net(x_n, t_n, text)
        v_target = (x_n - target) / tb(t_n)
        weights = torch.where(n == N, c.final_step_weight, 1.0).to(v.dtype)
        return (F.mse_loss(v, v_target, reduction="none").flatten(1).mean(1) * weights).mean()
