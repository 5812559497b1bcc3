"""Stage 2: adversarial post-training (APT, arXiv 2501.08316 §3), one iteration as a plain-torch function.

    G(z, c) = z - G^(z, c, T)                                   the one-step generator (§3.1), T = 1
    L_D = softplus(-D(x, c)) + softplus(D(G(z, c), c)) + L_aR1  non-saturating loss (§3.3), fakes detached
    L_aR1 = lambda || D(x, c) - D(x + sigma n, c) ||^2          approximate R1 on real data (§3.4, eq. 5)
    L_G = softplus(-D(G(z, c), c))                              D frozen in the G step
    G_ema <- decay G_ema + (1 - decay) G                        the product (§3.5: decay 0.995)

Three generalisations serve the streaming stage (AAPT, arXiv 2506.09350; ``apt.methods.streaming``), all off by
default: ``generate`` says how fakes are made (``one_step``, or a causal G's rollout: student forcing, or teacher forcing
from the real clips as its ablation);
``apt.gan_loss: relativistic`` with ``apt.r2_lambda`` > 0 swaps in AAPT's relativistic loss with approximate R2
on the fakes; ``extra`` adds a term with networks of its own to G's loss (distribution matching on the rollouts,
``apt.methods.dmd``). D may return logits of any shape (e.g. one per chunk): every loss is a mean over them.

D is a copy of the ORIGINAL diffusion weights with readout heads at several depths (``build_discriminator``,
§3.3), trained in full; it sees clean inputs at an ensemble timestep t ~ shift(U(0, 1), s) per sample.

``apt_step`` is shared by every runner: Lightning's Trainer (``apt.lit.apt``: one device, DDP, FSDP2),
the DeepSpeed runner (one engine per network) and ``eval/benchmark_train_step.py``. They differ only
in how a network is updated from a loss (``apt.methods.update.NetUpdate``) and how the EMA is held
(``update_ema``: whole, FSDP2-sharded or ZeRO-3-partitioned).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from apt.config import AptConfig
from apt.discriminator import Discriminator
from apt.losses import (
    approximate_r1,
    d_loss_nonsaturating,
    d_loss_relativistic,
    g_loss_nonsaturating,
    g_loss_relativistic,
)
from apt.methods.text_terms import g_loss_with_text_contrast, mismatch_term, mismatched_pairs
from apt.methods.update import NetUpdate, check_finite
from apt.models.backbone import TextCond


def build_discriminator(backbone: nn.Module, a: AptConfig) -> Discriminator:
    """APT's D around a diffusion backbone: readout heads at ``apt.readout_fractions``, t-shift ``apt.d_timestep_shift``."""
    return Discriminator(backbone, fractions=list(a.readout_fractions), num_heads=backbone.config.num_heads, timestep_shift=a.d_timestep_shift)


def one_step(G: nn.Module, z: torch.Tensor, text: TextCond, x_real: torch.Tensor | None = None) -> torch.Tensor:
    """G(z, c) = z - G^(z, c, T) at the final timestep T = 1 (``x_real`` unused)."""
    T = torch.ones(z.shape[0], device=z.device)
    return z - G(z, T, text)


Generate = Callable[[nn.Module, torch.Tensor, TextCond, torch.Tensor], torch.Tensor]
"""How G makes fakes from noise z shaped like the real clips x_real, (G, z, text, x_real): ``one_step``, or a causal G's
rollout (``apt.methods.streaming``); only teacher forcing reads x_real (its context)."""


@dataclass
class AptProgress:
    """What the step counts across iterations (saved with every checkpoint)."""

    g_updates: int = 0
    d_updates: int = 0
    win_streak: int = 0
    """Consecutive D steps in which D won outright (the collapse APT reports without aR1)."""


class SampleNoise:
    """The randomness of one iteration: one stream per sample, seeded by its index in the GLOBAL batch.

    A sample draws the same z, t and aR1 perturbation whether the global batch runs in one process or
    is split over ranks and micro-batches, so a ZeRO / DDP run can be compared exactly with a single
    device, and ranks never share noise. The step seed comes from the run's rng, which advances
    identically on every rank: rank 0's rng state is enough for exact resume.
    """

    def __init__(self, step_seed: int, indices: range):
        self.generators = [torch.Generator().manual_seed(step_seed + i) for i in indices]

    def randn(self, shape: torch.Size, device) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(device)

    def timesteps(self, D: Discriminator, device) -> torch.Tensor:
        return torch.cat([D.sample_t(1, g) for g in self.generators]).to(device)

    def rand(self, device) -> torch.Tensor:
        """One U(0, 1) draw per sample."""
        return torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(device)


class ExtraGLoss(Protocol):
    """A term added to G's adversarial loss that has networks of its own (the streaming stage's distribution
    matching, ``apt.methods.dmd``): ``prepare`` updates them once per iteration before D's step and returns its
    metrics; ``g_loss`` is the term on one micro-batch of G's fakes, with that micro-batch's noise streams."""

    name: str

    def prepare(self, G: nn.Module, parts: list[tuple[torch.Tensor, TextCond, SampleNoise]], generate: Generate, where: str) -> dict[str, torch.Tensor]: ...

    def g_loss(self, x_fake: torch.Tensor, text: TextCond, noise: SampleNoise) -> torch.Tensor: ...


def _mean(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([v.detach() for v in values]).mean()


def apt_step(G: nn.Module, D: nn.Module, micro_batches: list[tuple[torch.Tensor, TextCond]], *, update_g: NetUpdate, update_d: NetUpdate,
             update_ema: Callable[[float], None], a: AptConfig, progress: AptProgress, step_seed: int, rank: int = 0, world_size: int = 1,
             generate: Generate = one_step, extra: ExtraGLoss | None = None) -> dict[str, torch.Tensor]:
    """One APT iteration on this rank's gradient-accumulation micro-batches (real clips, their text); returns the metrics.

    Every D (and G) update accumulates over all micro-batches before it steps, so G and D updates stay
    separate under accumulation; the strategy averages the gradients over ranks. ``rank``/``world_size``
    are of the data (the ranks of a sequence-parallel group share samples and noise). ``extra``: a term added to
    G's loss (off in APT and AAPT).
    """
    k, device = len(micro_batches), micro_batches[0][0].device
    # 0. One noise stream per sample of the GLOBAL batch (micro-batch j of rank r holds samples (j * world + r) * B, ...).
    parts = []
    for j, (x_real, text) in enumerate(micro_batches):
        B = x_real.shape[0]
        first = (j * world_size + rank) * B
        parts.append((x_real, text, SampleNoise(step_seed, range(first, first + B))))
    where = f"generator update {progress.g_updates}"
    metrics: dict[str, torch.Tensor] = {}

    if extra is not None:  # its own networks first (e.g. DMD's fake score on fresh rollouts)
        metrics.update(extra.prepare(G, parts, generate, where))
    relativistic, use_r2 = a.gan_loss == "relativistic", a.r2_lambda > 0
    # 1. D step(s) (§3.3-3.4): real vs detached fakes, plus approximate R1 on real data: D(x) and D(x + sigma n)
    #    with the same t and text (and, with apt.r2_lambda > 0, approximate R2 on the fakes, AAPT). One batched D forward.
    for _ in range(a.d_steps_per_g_step):
        update_d.zero_grad()
        stats: dict[str, list[torch.Tensor]] = {"loss_d": [], "loss_adv": [], "d_real": [], "d_fake": [], "r1": []}
        if use_r2:
            stats["r2"] = []
        for x_real, text, noise in parts:
            B = x_real.shape[0]
            with torch.no_grad():
                x_fake = generate(G, noise.randn(x_real.shape[1:], device), text, x_real)
            t = noise.timesteps(D, device)
            x_perturbed = x_real + a.r1_sigma * noise.randn(x_real.shape[1:], device)
            x_in, texts = [x_real, x_perturbed, x_fake], [text, text, text]
            if use_r2:
                x_in, texts = x_in + [x_fake + a.r1_sigma * noise.randn(x_real.shape[1:], device)], texts + [text]
            if a.mismatch_weight > 0:  # optional, not in the paper (apt.methods.text_terms)
                x_mm, text_mm = mismatched_pairs(x_real, text)
                x_in, texts = x_in + [x_mm], texts + [text_mm]
            d_real, d_perturbed, d_fake, *rest = D(torch.cat(x_in), t.repeat(len(x_in)), TextCond.cat(texts)).split(B)
            d_fake_perturbed = rest.pop(0) if use_r2 else None
            loss_adv = d_loss_relativistic(d_real, d_fake) if relativistic else d_loss_nonsaturating(d_real, d_fake)
            if rest:
                loss_adv = loss_adv + mismatch_term(rest[0], a.mismatch_weight)
            r1 = approximate_r1(d_real, d_perturbed, weight=a.r1_lambda) if a.use_r1 else torch.zeros((), device=device)
            loss_d = loss_adv + r1
            if use_r2:
                r2 = approximate_r1(d_fake, d_fake_perturbed, weight=a.r2_lambda)
                loss_d = loss_d + r2
                stats["r2"].append(r2)
            check_finite("D loss", loss_d, where)
            update_d.backward(loss_d / k)
            for key, value in zip(("loss_d", "loss_adv", "d_real", "d_fake", "r1"), (loss_d, loss_adv, d_real.mean(), d_fake.mean(), r1)):
                stats[key].append(value)
        grad_norm_d = update_d.step()
        progress.d_updates += 1

    # 2. G step (after the D-only warm-up): fresh noise and timesteps, D frozen so no gradient reaches
    #    it (two ZeRO engines need this too); non-saturating loss softplus(-D(G(z))).
    if progress.d_updates > a.d_warmup_steps * a.d_steps_per_g_step:
        D.requires_grad_(False)
        update_g.zero_grad()
        losses_g, extras = [], []
        for x_real, text, noise in parts:
            x_fake = generate(G, noise.randn(x_real.shape[1:], device), text, x_real)
            t = noise.timesteps(D, device)
            if a.text_contrast_weight > 0:  # optional, not in the paper (apt.methods.text_terms)
                loss_g = g_loss_with_text_contrast(D, x_fake, t, text, a.text_contrast_weight)
            elif relativistic:  # D(real) is a constant of G's loss
                with torch.no_grad():
                    d_real = D(x_real, t, text)
                loss_g = g_loss_relativistic(D(x_fake, t, text), d_real)
            else:
                loss_g = g_loss_nonsaturating(D(x_fake, t, text))
            if extra is not None:
                extras.append(extra.g_loss(x_fake, text, noise))
                loss_g = loss_g + extras[-1]
            check_finite("G loss", loss_g, where)
            update_g.backward(loss_g / k)
            losses_g.append(loss_g)
        grad_norm_g = update_g.step()
        D.requires_grad_(True)
        D.backbone.requires_grad_(a.train_d_backbone)
        # 3. EMA of G: the product.
        update_ema(a.ema_decay)
        progress.g_updates += 1
        metrics.update(loss_g=_mean(losses_g), grad_norm_g=grad_norm_g)
        if extras:
            metrics[f"loss_{extra.name}"] = _mean(extras)

    # 4. Training health: D(real), D(fake), aR1, gradient norms; warn when D wins outright.
    d = {key: _mean(values) for key, values in stats.items()}
    metrics.update(loss_d=d["loss_d"], d_real=d["d_real"], d_fake=d["d_fake"], r1=d["r1"], grad_norm_d=grad_norm_d)
    if use_r2:
        metrics["r2"] = d["r2"]
    watch_collapse(progress, d["loss_adv"].item(), d["d_real"].item(), d["d_fake"].item(), patience=a.collapse_patience, warn=rank == 0)
    return metrics


def watch_collapse(progress: AptProgress, loss_adv: float, d_real: float, d_fake: float, *, patience: int, warn: bool = True) -> None:
    """The collapse APT reports without aR1: D separates perfectly and G stops learning."""
    wins = loss_adv < 0.05 and d_real > 0 > d_fake
    progress.win_streak = progress.win_streak + 1 if wins else 0
    if warn and progress.win_streak == patience:
        warnings.warn(
            f"D has won outright for {progress.win_streak} steps (D loss {loss_adv:.3g}, D(real) {d_real:.2f}, "
            f"D(fake) {d_fake:.2f}): training is collapsing. Check apt.use_r1 / r1_lambda / r1_sigma and the learning rates.",
            stacklevel=2,
        )


def make_optimizer(params, lr: float, a: AptConfig) -> torch.optim.Optimizer:
    """The paper's RMSProp (alpha 0.9, no weight decay), or Adam with ``apt.adam_betas`` (the demo's choice)."""
    if a.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=a.rmsprop_alpha, weight_decay=0.0)
    return torch.optim.Adam(params, lr=lr, betas=tuple(a.adam_betas), weight_decay=0.0)
