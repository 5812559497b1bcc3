"""Stage 1 under Lightning: holds the student, its EMA (the product) and the frozen teacher; the loss
is ``apt.methods.consistency.consistency_loss``. With ``lora.rank > 0`` the student is the teacher's
weights plus adapters, its EMA the EMA adapters, and the teacher the same module with its adapters off
(``apt.lora``): one copy of the backbone in memory."""

from __future__ import annotations

import torch

from apt import lora
from apt.config import Config
from apt.lit.base import EmaNetModule
from apt.methods.consistency import consistency_loss, distillation_timesteps


class DistillModule(EmaNetModule):
    loss_label = "distillation loss"

    def __init__(self, config: Config):
        super().__init__(config)
        if config.lora.rank:
            self.net = self.add_lora(self.load_backbone(config.distill.teacher, "net_ema"), "net")
            self.teacher = lora.WithoutAdapters(self.net)  # not a module: the shared base is held (and saved) once
        else:
            self.teacher = self.frozen_copy(self.load_backbone(config.distill.teacher, "net_ema"))
            self.net = self.load_backbone(config.distill.teacher, "net_ema")  # the student starts from the teacher
            self.net_ema = self.frozen_copy(self.net)
        self.register_buffer("ts", distillation_timesteps(config.distill), persistent=False)

    def part_loss(self, batch: dict) -> torch.Tensor:
        d = self.config.distill
        text = self.encode_batch(batch)
        negative = self.encode([d.negative_prompt] * batch["x"].shape[0], allow_empty=True)
        return consistency_loss(self.net, self.teacher, batch["x"], text, negative, ts=self.ts, rng=self.rng, d=d)
