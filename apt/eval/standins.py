"""Tiny TorchScript stand-ins with the real files' call signatures, for tests and dry runs.

They are scripted and saved like the real detectors and go through the same `torch.jit.load`
path (`apt.eval.fvd.load_i3d`, `apt.eval.fid.load_inception`), so everything except the
network weights is exercised. Numbers computed with them are the pipeline's, not the metric's.

- `StandInI3D` mimics `i3d_torchscript.pt` (StyleGAN-V FVD): forward(x, rescale, resize,
  return_features) on uint8 (B, 3, T, H, W) -> (B, 400) logits (softmax unless
  return_features), resizing to `resize_to` x `resize_to` inside when resize=True (224 in the
  real file).
- `StandInInception` mimics `inception-2015-12-05.pt` (StyleGAN2-ADA / clean-fid FID):
  forward(img, return_features, use_fp16, no_output_bias) on [0, 255] (N, 3, H, W) of any size,
  bilinear resize to 299, `(x - 128) / 128`, then `self.layers` -> (N, 2048) pool3-like
  features (or 1008 logits unless return_features).

Legend: B/N batch, T frames, H height, W width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StandInI3D(nn.Module):
    """I3D-shaped stand-in: one strided Conv3d (kernel (3, patch, patch)), mean pool, Linear to 400."""

    def __init__(self, *, resize_to: int = 224, patch: int = 7) -> None:
        super().__init__()
        self.resize_to = resize_to
        self.conv = nn.Conv3d(3, 16, kernel_size=(3, patch, patch), stride=(2, patch, patch))
        self.fc = nn.Linear(16, 400)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        x = x.float()
        if rescale:
            x = x / 127.5 - 1.0
        if resize:
            x = F.interpolate(x, size=(x.shape[2], self.resize_to, self.resize_to), mode="trilinear",
                              align_corners=False)
        logits = self.fc(self.conv(x).relu().mean(dim=(2, 3, 4)))
        return logits if return_features else logits.softmax(dim=-1)


class _StandInInceptionLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, kernel_size=13, stride=13)
        self.proj = nn.Conv2d(32, 2048, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).relu()
        return self.proj(h).mean(dim=(2, 3), keepdim=True)  # (N, 2048, 1, 1) like pool3


class StandInInception(nn.Module):
    """Inception-shaped stand-in: `layers` takes normalised 299x299 input, as clean-fid calls it."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _StandInInceptionLayers()
        self.output = nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = img.to(torch.float32)
        if x.shape[2] != 299 or x.shape[3] != 299:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128.0) / 128.0).reshape(-1, 2048)
        if return_features:
            return features
        return self.output(features)


def save_standin_i3d(path: str, *, resize_to: int = 224, patch: int = 7, seed: int = 0) -> str:
    """Script a seeded `StandInI3D` and save it at `path` (e.g. .../i3d_torchscript.pt); returns path."""
    torch.manual_seed(seed)
    torch.jit.script(StandInI3D(resize_to=resize_to, patch=patch).eval()).save(path)
    return path


def save_standin_inception(path: str, *, seed: int = 0) -> str:
    """Script a seeded `StandInInception` and save it at `path` (.../inception-2015-12-05.pt); returns path."""
    torch.manual_seed(seed)
    torch.jit.script(StandInInception().eval()).save(path)
    return path
