"""Losses as pure functions of tensors.

- Flow matching (rectified flow): || v_pred - (eps - x0) ||^2, or in x0 space for x0-parameterised nets.
- Non-saturating GAN (Goodfellow et al. 2014), as APT (arXiv 2501.08316 §3.3):
      L_D = softplus(-D(x)) + softplus(D(G(z))),   L_G = softplus(-D(G(z)))
- Matching-aware D term (not in APT; Reed et al. 2016, GigaGAN): real x with the wrong text is fake,
      L_match = mean softplus(D(x, c_wrong)).
- Text contrast G term (not in APT): L = mean softplus(D(G(z), c_wrong) - D(G(z), c)).
- Relativistic GAN (Jolicoeur-Martineau 2019; R3GAN, arXiv 2501.05441), as AAPT (arXiv 2506.09350 §3.3), on
  pairs (real i, fake i):  L_D = softplus(-(D(x) - D(G(z)))),   L_G = softplus(-(D(G(z)) - D(x)))
- Approximate R1 (APT §3.4): L_aR1 = lambda * mean || D(x) - D(x + sigma n) ||^2, real x only; approximate R2
  (AAPT) is the same on the (detached) fakes.
- Consistency distillation target: MSE between student velocity and a bootstrapped target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t_B: torch.Tensor, *, space: str = "velocity") -> torch.Tensor:
    """MSE of the velocity (space='velocity') or of the implied clean sample x0_hat = x_t - t v (space='x0')."""
    if space == "velocity":
        return F.mse_loss(v_pred, eps - x0)
    if space == "x0":
        t = t_B.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        x_t = (1 - t) * x0 + t * eps
        return F.mse_loss(x_t - t * v_pred, x0)
    raise ValueError(f"unknown loss space {space!r}")


def d_loss_nonsaturating(logits_real_B: torch.Tensor, logits_fake_B: torch.Tensor) -> torch.Tensor:
    """mean softplus(-D(x)) + mean softplus(D(G(z)))."""
    return F.softplus(-logits_real_B).mean() + F.softplus(logits_fake_B).mean()


def g_loss_nonsaturating(logits_fake_B: torch.Tensor) -> torch.Tensor:
    """mean softplus(-D(G(z)))."""
    return F.softplus(-logits_fake_B).mean()


def d_loss_relativistic(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """mean softplus(-(D(x) - D(G(z)))) over paired logits (any shape, e.g. (B, chunks))."""
    return F.softplus(logits_fake - logits_real).mean()


def g_loss_relativistic(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """mean softplus(-(D(G(z)) - D(x))) over paired logits."""
    return F.softplus(logits_real - logits_fake).mean()


def mismatch_loss(logits_mismatched_B: torch.Tensor) -> torch.Tensor:
    """mean softplus(D(x, c')): a real clip under another sample's text, judged as a fake."""
    return F.softplus(logits_mismatched_B).mean()


def text_contrast_loss(logits_own_B: torch.Tensor, logits_other_B: torch.Tensor) -> torch.Tensor:
    """mean softplus(D(x, c') - D(x, c)): -log of D's odds that x goes with its own text c rather than c'."""
    return F.softplus(logits_other_B - logits_own_B).mean()


def approximate_r1(logits_real_B: torch.Tensor, logits_perturbed_B: torch.Tensor, *, weight: float) -> torch.Tensor:
    """lambda * mean (D(x) - D(x + sigma n))^2; both logits with the same t and text."""
    return weight * (logits_real_B.float() - logits_perturbed_B.float()).pow(2).mean()
