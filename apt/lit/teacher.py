"""Stage 0 (embedded demo only): pretrain the text-to-video flow teacher with flow matching.

Rectified flow (DESIGN.md §2): x_t = (1 - t) x0 + t eps, the network predicts v = eps - x0.
Captions are dropped to the empty prompt with probability text.dropout so CFG works at sampling.
"""

from __future__ import annotations

import torch

from apt.config import Config
from apt.flow import add_noise, sample_timesteps
from apt.lit.base import EmaNetModule
from apt.losses import flow_matching_loss


class TeacherModule(EmaNetModule):
    loss_label = "teacher loss"

    def __init__(self, config: Config):
        super().__init__(config)
        self.net = self.build_backbone()
        self.net_ema = self.frozen_copy(self.net)

    def part_loss(self, batch: dict) -> torch.Tensor:
        c = self.config
        x0 = batch["x"]
        B = x0.shape[0]
        # 1. Drop captions to the empty prompt so the model also learns the unconditional velocity (CFG).
        keep = self.rand(B) >= c.text.dropout
        captions = [cap if k else "" for cap, k in zip(batch["caption"], keep.tolist())]
        text = self.encode(captions, allow_empty=True)
        # 2. Noise the clean clips at t ~ shift(p(t), s).
        eps = self.randn(*x0.shape)
        t = sample_timesteps(B, shift=c.flow.train_shift, distribution=c.flow.timestep_distribution, generator=self.rng).to(self.device)
        x_t = add_noise(x0, eps, t)
        # 3. Flow-matching loss (x0 space for x0-parameterised flavours: same optimum, bounded weights).
        v = self.net(x_t, t, text)
        return flow_matching_loss(v, x0, eps, t, space=self.net.config.prediction)
