"""Distribution matching on student-forced rollouts, an option of the streaming stage (``stream.dmd_weight`` > 0).

DMD (Yin et al., arXiv 2311.18828; DMD2, arXiv 2405.14867) moves a one-step generator's samples along the
difference of two scores: that of the teacher (the data) and that of a "fake score" network trained on the
generator's own samples. Self Forcing (arXiv 2506.08009 §3.3) applies it to student-forced rollouts, so each
chunk is judged in the context the generator itself made. Here it is added to AAPT's adversarial loss:

    x       = a rollout of G (student forcing)                        (B, C, T, H, W), gradient to G
    x_t     = (1 - t) x + t eps,  t ~ U(t_min, t_max) per sample
    x0_real = x_t - t v_real(x_t)   the frozen causal teacher with CFG
    x0_fake = x_t - t v_fake(x_t)   the fake score, a copy of the teacher trained on G's rollouts
    L_G    += w 1/2 || x - sg(x - g) ||^2,  g = (x0_fake - x0_real) / mean|x - x0_real|   (its gradient in x is w g)
    L_fake  = || v_fake(x_t) - (eps - x) ||^2  on detached rollouts (flow matching), ``stream.fake_score_steps`` per iteration

How the two scores read the noised rollout (``ReadScore``) depends on the teacher:

- a causal teacher (the default: ``apt.teacher``) reads it as a stream would (one forward), teacher-forced on the
  rollout itself (``apt.methods.streaming.teacher_forced_stream``: chunk i at t with G's clean chunk i - 1 recycled),
  as it was trained. It says what a chunk should look like after the chunks G made before it, so it takes those
  chunks as given: a stream that has drifted reads as a likely continuation of its own drift.
- a bidirectional teacher (``stream.dmd_teacher``; Self Forcing's real score is its bidirectional base model) reads
  whole windows of the training length (``WholeClipWindows``: overlapping by half a window, a frame's output the mean
  over the windows that hold it), so a clip that changes midway lies inside a window that sees both sides.

The fake score is a copy of the teacher and reads the rollout the same way. Its loss is on the velocity whatever the
flavour's ``prediction`` (the same optimum as the x0-space loss an x0-parameterised teacher trained with).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from apt.flow import add_noise
from apt.methods.apt import Generate, SampleNoise
from apt.methods.streaming import teacher_forced_stream
from apt.methods.update import NetUpdate, check_finite
from apt.models.backbone import TextCond

ReadScore = Callable[[nn.Module, torch.Tensor, torch.Tensor, TextCond, torch.Tensor], torch.Tensor]
"""How a score network reads a noised rollout: ``read(net, x_t, t_B, text, x_clean)`` -> its output for every frame."""


class WholeClipWindows:
    """``ReadScore`` of a bidirectional network on a rollout of any length: windows of ``window_frames`` frames starting
    every ``window_frames // 2`` (and one ending at the last frame), batched into one forward; a frame's output is the
    mean over the windows that hold it. A rollout of ``window_frames`` frames is one forward of the whole clip."""

    def __init__(self, window_frames: int):
        if window_frames < 1:
            raise ValueError(f"window_frames must be positive, got {window_frames}")
        self.window_frames = window_frames

    def starts(self, frames: int) -> list[int]:
        W = self.window_frames
        if frames < W:
            raise ValueError(f"a rollout of {frames} frames is shorter than the score's {W}-frame window")
        starts = list(range(0, frames - W + 1, max(1, W // 2)))
        return starts if starts[-1] == frames - W else [*starts, frames - W]

    def __call__(self, net: nn.Module, x_t: torch.Tensor, t_B: torch.Tensor, text: TextCond, x_clean: torch.Tensor) -> torch.Tensor:
        B, W = x_t.shape[0], self.window_frames
        starts = self.starts(x_t.shape[2])
        n = len(starts)
        outs = net(torch.cat([x_t[:, :, s : s + W] for s in starts]), t_B.repeat(n), TextCond.cat([text] * n)).split(B)
        total, count = torch.zeros_like(x_t), torch.zeros(x_t.shape[2], dtype=x_t.dtype, device=x_t.device)
        for s, out in zip(starts, outs):
            total[:, :, s : s + W] += out
            count[s : s + W] += 1
        return total / count.view(1, 1, -1, 1, 1)


T_MIN, T_MAX = 0.02, 0.98
"""The noise levels of both losses (DMD2 avoids the ends, where the two scores carry no signal)."""


def _bcast(t_B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t_B.view(-1, *([1] * (x.ndim - 1)))


def dmd_loss(x: torch.Tensor, real: nn.Module, fake: nn.Module, text: TextCond, negative: TextCond | None, *, cfg_scale: float,
             t_B: torch.Tensor, eps: torch.Tensor, read: ReadScore | None = None) -> torch.Tensor:
    """1/2 || x - sg(x - g) ||^2 (mean over elements): its gradient in x is the normalised score difference g; both
    scores read the noised rollout through ``read`` (None: teacher-forced, ``teacher_forced_stream``)."""
    read = read or teacher_forced_stream
    with torch.no_grad():
        x_clean = x.detach()
        x_t = add_noise(x_clean, eps, t_B)
        if negative is None or cfg_scale == 1.0:
            v_real = read(real, x_t, t_B, text, x_clean)
        else:
            both = read(real, torch.cat([x_t, x_t]), torch.cat([t_B, t_B]), TextCond.cat([text, negative]), torch.cat([x_clean, x_clean]))
            v_cond, v_neg = both.chunk(2)
            v_real = v_neg + cfg_scale * (v_cond - v_neg)
        v_fake = read(fake, x_t, t_B, text, x_clean)
        x0_real, x0_fake = x_t - _bcast(t_B, x_t) * v_real, x_t - _bcast(t_B, x_t) * v_fake
        scale = (x_clean - x0_real).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True).clamp_min(1e-6)
        g = (x0_fake - x0_real) / scale
    return 0.5 * ((x - (x_clean - g)) ** 2).mean()


def fake_score_loss(fake: nn.Module, x: torch.Tensor, text: TextCond, *, t_B: torch.Tensor, eps: torch.Tensor,
                    read: ReadScore | None = None) -> torch.Tensor:
    """Flow matching of the fake score on G's (detached) rollouts, read through ``read`` (None: teacher-forced)."""
    read = read or teacher_forced_stream
    x = x.detach()
    v = read(fake, add_noise(x, eps, t_B), t_B, text, x)
    return ((v - (eps - x)) ** 2).mean()


def uniform_t(noise: SampleNoise, device) -> torch.Tensor:
    """t ~ U(T_MIN, T_MAX), one per sample from its own stream."""
    return T_MIN + (T_MAX - T_MIN) * noise.rand(device)


class DistributionMatching:
    """The DMD term of one streaming run (an ``apt.methods.apt.ExtraGLoss``): the frozen teacher (real score), the
    trained fake score and its update, and how both read a rollout (``read``: None, teacher-forced, for a causal
    teacher; ``WholeClipWindows`` for a bidirectional one). Its metrics: ``loss_fake_score`` and ``loss_dmd`` (weighted)."""

    name = "dmd"

    def __init__(self, real: nn.Module, fake: nn.Module, update_fake: NetUpdate, *, weight: float, cfg_scale: float, fake_steps: int,
                 negative: Callable[[int], TextCond], read: ReadScore | None = None):
        self.real, self.fake, self.update_fake, self.read = real, fake, update_fake, read
        self.weight, self.cfg_scale, self.fake_steps, self.negative = weight, cfg_scale, fake_steps, negative

    def prepare(self, G: nn.Module, parts: list[tuple[torch.Tensor, TextCond, SampleNoise]], generate: Generate, where: str) -> dict[str, torch.Tensor]:
        """``fake_steps`` updates of the fake score, each on fresh rollouts of every micro-batch; the last one's loss."""
        k = len(parts)
        for _ in range(self.fake_steps):
            self.update_fake.zero_grad()
            losses = []
            for x_real, text, noise in parts:
                device = x_real.device
                with torch.no_grad():
                    x = generate(G, noise.randn(x_real.shape[1:], device), text, x_real)
                loss = fake_score_loss(self.fake, x, text, t_B=uniform_t(noise, device), eps=noise.randn(x_real.shape[1:], device), read=self.read)
                check_finite("fake-score loss", loss, where)
                self.update_fake.backward(loss / k)
                losses.append(loss.detach())
            self.update_fake.step()
        return {"loss_fake_score": torch.stack(losses).mean()}

    def g_loss(self, x_fake: torch.Tensor, text: TextCond, noise: SampleNoise) -> torch.Tensor:
        """w times the DMD loss of G's rollout ``x_fake`` (added to G's adversarial loss)."""
        device = x_fake.device
        t_B, eps = uniform_t(noise, device), noise.randn(x_fake.shape[1:], device)
        negative = self.negative(x_fake.shape[0]) if self.cfg_scale != 1.0 else None
        return self.weight * dmd_loss(x_fake, self.real, self.fake, text, negative, cfg_scale=self.cfg_scale, t_B=t_B, eps=eps,
                                       read=self.read)
