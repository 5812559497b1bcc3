"""Stage 0 (embedded demo only) under Lightning: holds the teacher network and its EMA, from scratch or from a trained
teacher (``model.init``); the loss is ``apt.methods.flow_matching.teacher_loss``."""

from __future__ import annotations

import torch

from apt.config import Config
from apt.lit.base import EmaNetModule
from apt.methods.flow_matching import teacher_loss


class TeacherModule(EmaNetModule):
    loss_label = "teacher loss"

    def __init__(self, config: Config):
        super().__init__(config)
        self.net = self.build_backbone()
        self.net_ema = self.frozen_copy(self.net)

    def build_backbone(self):
        """The model's own init, or the EMA weights of ``model.init`` (fine-tuning a trained teacher)."""
        init = self.config.model.init
        return self.load_backbone(init, "net_ema") if init else super().build_backbone()

    def part_loss(self, batch: dict) -> torch.Tensor:
        c = self.config
        encode = lambda captions: self.encode(captions, allow_empty=True)  # noqa: E731
        return teacher_loss(self.net, batch["x"], batch["caption"], encode=encode, rng=self.rng, flow=c.flow, text_dropout=c.text.dropout)
