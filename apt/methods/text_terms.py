"""Two text-alignment terms that are NOT in APT (off by default: ``apt.mismatch_weight = 0`` and
``apt.text_contrast_weight = 0`` reproduce the paper's objective). Each is an optional piece of
``apt.methods.apt.apt_step``; docs/demo.md shows what they do on the toy.

- Matching-aware D term (GAN-INT-CLS, Reed et al. 2016; GigaGAN, arXiv 2303.05511): a real clip under
  the batch's most similar *different* text counts as fake, so D must judge text alignment too:
  ``L_D += w * mean softplus(D(x, c'))``.
- Text-contrast G term: G's sample must look more like its own prompt than like the nearest other one
  to D, ``L_G += w * mean softplus(D(G(z), c') - D(G(z), c))``, a guidance-like signal.
"""

from __future__ import annotations

import torch
from torch import nn

from apt.losses import g_loss_nonsaturating, mismatch_loss, text_contrast_loss
from apt.models.backbone import TextCond


def mismatched_pairs(x_real: torch.Tensor, text: TextCond) -> tuple[torch.Tensor, TextCond]:
    """The D term's inputs, batched with D's other inputs: real clips under the nearest other text."""
    return x_real, text.nearest_other()


def mismatch_term(logits_mismatched_B: torch.Tensor, weight: float) -> torch.Tensor:
    """w * mean softplus(D(x, c')): the mismatched real pairs judged as fakes."""
    return weight * mismatch_loss(logits_mismatched_B)


def g_loss_with_text_contrast(D: nn.Module, x_fake: torch.Tensor, t_B: torch.Tensor, text: TextCond, weight: float) -> torch.Tensor:
    """The G loss with the text-contrast term: one D forward over (G(z), c) and (G(z), c')."""
    d_fake, d_other = D(torch.cat([x_fake, x_fake]), t_B.repeat(2), TextCond.cat([text, text.nearest_other()])).split(x_fake.shape[0])
    return g_loss_nonsaturating(d_fake) + weight * text_contrast_loss(d_fake, d_other)
