"""AAPT's three stages under Lightning (arXiv 2506.09350 §3.2-3.4), each reusing the holder and method of its APT
counterpart on a causal model (``model.causal_chunk_frames`` > 0):

    stream_teacher   causal adaptation: ``teacher_loss``, teacher-forced, from the bidirectional teacher (``stream.init``)
    stream_distill   per-chunk consistency distillation: ``consistency_loss``, student and causal teacher teacher-forced
    stream_apt       adversarial training with student forcing: ``apt_step`` with a rollout as ``generate`` and a
                     per-chunk discriminator on windows of the training length (``apt.methods.streaming``)

Sampling (the sample callback, ``apt.inference``) streams chunk by chunk with the key/value cache.
"""

from __future__ import annotations

import torch

from apt.config import Config
from apt.lit.apt import AptModule
from apt.lit.distill import DistillModule
from apt.lit.teacher import TeacherModule
from apt.methods.apt import make_optimizer
from apt.methods.consistency import consistency_loss
from apt.methods.dmd import DistributionMatching, WholeClipWindows
from apt.methods.flow_matching import teacher_loss
from apt.methods.streaming import ChunkDiscriminator, StudentForcing, TeacherForced, TeacherForcing
from apt.methods.update import NetUpdate, OptimizerUpdate
from apt.models import factory


class StreamTeacherModule(TeacherModule):
    """Causal adaptation with teacher forcing: flow matching on the causal model, clean previous chunks recycled."""

    loss_label = "causal teacher loss"

    def build_backbone(self):
        return factory.load_causal_from_bidirectional(self.config, self.config.stream.init, "net_ema", text_dim=self.text_encoder.dim)

    def part_loss(self, batch: dict) -> torch.Tensor:
        c = self.config
        encode = lambda captions: self.encode(captions, allow_empty=True)  # noqa: E731
        return teacher_loss(TeacherForced(self.net, batch["x"]), batch["x"], batch["caption"], encode=encode, rng=self.rng,
                            flow=c.flow, text_dropout=c.text.dropout)


class StreamDistillModule(DistillModule):
    """Per-chunk consistency distillation of the causal teacher; both networks see the clean previous chunks."""

    def part_loss(self, batch: dict) -> torch.Tensor:
        d, x0 = self.config.distill, batch["x"]
        text = self.encode_batch(batch)
        negative = self.encode([d.negative_prompt] * x0.shape[0], allow_empty=True)
        return consistency_loss(TeacherForced(self.net, x0), TeacherForced(self.teacher, x0), x0, text, negative, ts=self.ts, rng=self.rng, d=d)


class StreamAptModule(AptModule):
    """Adversarial training with student forcing: G rolls out as at inference (``stream.forcing: teacher``: from the real
    clips' past instead, the ablation); D (from the causal teacher) gives one logit per chunk on windows of
    ``stream.window_frames``. With ``stream.dmd_weight`` > 0, distribution matching on
    the rollouts is added to G's loss (``apt.methods.dmd``): its frozen teacher (``teacher``, not saved: the causal
    ``apt.teacher``, or the bidirectional ``stream.dmd_teacher``) and a fake score (``fake_score``, a copy of it, saved
    and resumed with its optimiser) are held too."""

    def __init__(self, config: Config):
        super().__init__(config)
        s = config.stream
        self.make_fakes = (StudentForcing(grad_chunks=s.grad_chunks, detach_context=s.detach_context) if s.forcing == "student"
                           else TeacherForcing())
        if s.dmd_weight > 0:
            self.teacher = self.frozen_copy(self.load_score_teacher())
            self.fake_score = self.load_score_teacher()

    def load_score_teacher(self):
        """Distribution matching's teacher: ``stream.dmd_teacher`` (bidirectional), else the causal ``apt.teacher``."""
        path = self.config.stream.dmd_teacher
        if path:
            return factory.load_bidirectional(self.config, path, "net_ema", text_dim=self.text_encoder.dim)
        return self.load_backbone(self.config.apt.teacher, "net_ema")

    def training_step(self, batch, batch_idx):
        if self.config.stream.dmd_weight > 0 and self.extra is None:  # the third optimiser is the fake score's
            self.extra = self.distribution_matching(
                OptimizerUpdate(self.optimizers()[2], self.fake_score, self.manual_backward, max_norm=self.config.optim.grad_clip))
        return super().training_step(batch, batch_idx)

    def distribution_matching(self, update_fake: NetUpdate) -> DistributionMatching:
        """The DMD term of ``apt_step`` (``extra``), the fake score stepping through ``update_fake``."""
        s = self.config.stream
        negatives = {}  # the negative prompt encoded once per batch size, not at every G micro-batch

        def negative(n: int):
            if n not in negatives:
                negatives[n] = self.encode([self.config.flow.negative_prompt] * n, allow_empty=True)
            return negatives[n]

        read = WholeClipWindows(s.window_frames or self.config.data.frames) if s.dmd_teacher else None  # None: teacher-forced
        return DistributionMatching(self.teacher, self.fake_score, update_fake, weight=s.dmd_weight, cfg_scale=s.dmd_cfg_scale,
                                    fake_steps=s.fake_score_steps, negative=negative, read=read)

    def trainer_max_steps(self) -> int:
        s, a = self.config.stream, self.config.apt
        fake_steps = (a.d_warmup_steps + self.config.train.max_steps) * s.fake_score_steps if s.dmd_weight > 0 else 0
        return super().trainer_max_steps() + fake_steps

    def configure_optimizers(self):
        optimizers = super().configure_optimizers()
        if self.config.stream.dmd_weight == 0:
            return optimizers
        return (*optimizers, make_optimizer(self.fake_score.parameters(), self.config.stream.lr_fake_score, self.config.apt))

    def build_discriminator(self, backbone):
        a, c = self.config.apt, self.config
        return ChunkDiscriminator(backbone, fractions=list(a.readout_fractions), num_heads=backbone.config.num_heads,
                                  timestep_shift=a.d_timestep_shift, window_frames=c.stream.window_frames or c.data.frames,
                                  context=c.stream.d_context)
