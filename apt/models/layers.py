"""Small building blocks of the DiT: RMSNorm, 3D RoPE, 3D sin-cos positions, timestep embedding.

Legend: S sequence (text then visual), E head dim, D width.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019), used on queries and keys (QK-norm, Goku §2)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def timestep_embedding(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (scaled) timesteps, as in DiT / ADM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t_B.device, dtype=torch.float32) / half)
    args = t_B.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Split an even head dim into three even parts for (t, h, w); h and w get the larger share."""
    d_hw = 2 * ((head_dim * 3 // 8) // 2)
    return head_dim - 2 * d_hw, d_hw, d_hw


def _axis_angles(dim: int, n: int, theta: float, device) -> torch.Tensor:
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    return torch.arange(n, device=device, dtype=torch.float32)[:, None] * freqs[None]  # (n, dim/2)


def rope_3d(head_dim: int, T: int, H: int, W: int, *, num_text: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (S, E) for 3D RoPE on a (T, H, W) token grid; the text tokens come first, unrotated."""
    dt, dh, dw = _axis_dims(head_dim)
    at = _axis_angles(dt, T, theta, device)[:, None, None].expand(T, H, W, dt // 2)
    ah = _axis_angles(dh, H, theta, device)[None, :, None].expand(T, H, W, dh // 2)
    aw = _axis_angles(dw, W, theta, device)[None, None, :].expand(T, H, W, dw // 2)
    angles = torch.cat([at, ah, aw], dim=-1).reshape(T * H * W, head_dim // 2)
    angles = torch.cat([angles.new_zeros(num_text, head_dim // 2), angles])  # text: identity rotation
    angles = angles.repeat_interleave(2, dim=-1)  # pairs (x0, x1) share one angle
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos_SE: torch.Tensor, sin_SE: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim of x (..., S, E)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)
    return (x.float() * cos_SE + rotated.float() * sin_SE).to(x.dtype)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos_SE: torch.Tensor, sin_SE: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """``apply_rope(RMSNorm(x))`` fused: one float32 pass over x (..., S, E) and one rounding to x's dtype.

    The unfused path rounds twice (after the norm and after the rotation); in float32 both agree to
    rounding, in bf16 they differ by at most a few bf16 ulps. Under ``torch.compile`` this becomes one
    kernel (perf switch ``perf.fused_qk_norm_rope``, applied by ``apt.perf``).
    """
    x32 = x.float()
    n = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    rotated = torch.stack([-n[..., 1::2], n[..., 0::2]], dim=-1).flatten(-2)
    return (n * cos_SE + rotated * sin_SE).to(x.dtype)


def sincos_3d(dim: int, T: int, H: int, W: int, *, device, dtype) -> torch.Tensor:
    """Fixed 3D sin-cos position table (N, D) at unit scale: a third of the channels per axis."""
    d_axis = 2 * (dim // 6)
    parts = []
    for n, shape in ((T, (T, 1, 1)), (H, (1, H, 1)), (W, (1, 1, W))):
        pos = torch.arange(n, device=device, dtype=torch.float32)
        freqs = 1.0 / 10000 ** (torch.arange(0, d_axis, 2, device=device, dtype=torch.float32) / d_axis)
        ang = pos[:, None] * freqs[None]
        emb = torch.cat([ang.sin(), ang.cos()], dim=-1).reshape(*shape, d_axis).expand(T, H, W, d_axis)
        parts.append(emb)
    table = torch.cat(parts, dim=-1).reshape(T * H * W, 3 * d_axis)
    table = nn.functional.pad(table, (0, dim - 3 * d_axis))
    return table.to(dtype)
