"""Stage 0 (the demo's teacher): flow matching on rectified-flow paths.

    x_t = (1 - t) x0 + t eps,   t ~ shift(p(t), s),   loss = || v_theta(x_t, t, c) - (eps - x0) ||^2

(Liu et al. 2022, rectified flow; SD3, arXiv 2403.03206 §2-3 for the logit-normal p(t) and the shift.)
x0-parameterised flavours take the same loss in x0 space (``apt.losses.flow_matching_loss``): same
optimum, bounded weights. Captions are dropped to the empty prompt with probability ``text_dropout``
so that classifier-free guidance works at sampling time (Ho & Salimans 2022).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from apt.config import FlowConfig
from apt.flow import add_noise, sample_timesteps
from apt.losses import flow_matching_loss
from apt.models.backbone import TextCond


def teacher_loss(net: nn.Module, x0: torch.Tensor, captions: list[str], *, encode: Callable[[list[str]], TextCond],
                 rng: torch.Generator, flow: FlowConfig, text_dropout: float) -> torch.Tensor:
    """The flow-matching loss of ``net`` on one batch of clean clips ``x0`` (B, C, T, H, W) and their captions.

    ``encode`` turns captions (the empty string included) into the text condition; every random draw
    comes from ``rng``, in a fixed order, so a resumed run continues exactly."""
    B, device = x0.shape[0], x0.device
    # 1. Drop captions to the empty prompt so the model also learns the unconditional velocity (CFG).
    keep = torch.rand(B, generator=rng).to(device) >= text_dropout
    text = encode([cap if k else "" for cap, k in zip(captions, keep.tolist())])
    # 2. Noise the clean clips at t ~ shift(p(t), s).
    eps = torch.randn(*x0.shape, generator=rng).to(device)
    t = sample_timesteps(B, shift=flow.train_shift, distribution=flow.timestep_distribution, generator=rng).to(device)
    x_t = add_noise(x0, eps, t)
    # 3. Regress the velocity (in x0 space for x0-parameterised flavours).
    v = net(x_t, t, text)
    return flow_matching_loss(v, x0, eps, t, space=net.config.prediction)
