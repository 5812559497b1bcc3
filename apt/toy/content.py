"""Pixel statistics that say what a generator's toy clips look like, next to real ones (experiments/toy_gap.py).

- ``high_frequency_share``: sharpness. A one-step regression averages the modes the caption leaves
  open and blurs; the paper's claim is that APT removes that blur.
- ``distractor_visible``: the toy world's uncaptioned distractor (random shape, colour, position and
  motion) is the detail a regression averages away first; the share of clips that still show it.

Both take clips x (B, C, T, H, W) in [-1, 1].
"""

from __future__ import annotations

import numpy as np
import torch

from apt.toy.world import COLOURS, parse_caption

HIGH_FREQUENCY = 0.25
"""Spatial frequencies at or above this many cycles per pixel (in either axis) count as high."""
COLOUR_RADIUS = 70.0
"""A pixel shows a toy colour when within this RGB distance (0-255 levels) of it."""
DISTRACTOR_MIN_PIXELS = 3.0
"""A clip shows its distractor when this many pixels per frame, on average, have another toy colour."""


def high_frequency_share(x_BCTHW: torch.Tensor) -> float:
    """Share of the clips' spatial spectral power (the mean of each frame excluded) at high frequencies."""
    power = torch.fft.fft2(x_BCTHW.detach().float().clamp(-1, 1)).abs() ** 2
    fy, fx = torch.fft.fftfreq(power.shape[-2]).abs(), torch.fft.fftfreq(power.shape[-1]).abs()
    radius_HW = torch.maximum(fy[:, None], fx[None, :])
    total = power[..., radius_HW > 0].sum()
    return float(power[..., radius_HW >= HIGH_FREQUENCY].sum() / total) if total > 0 else 0.0


def distractor_visible(x_BCTHW: torch.Tensor, prompts: list[str]) -> float:
    """Share of clips that show their distractor (``distractor_shown``)."""
    return float(np.mean(distractor_shown(x_BCTHW, prompts)))


def distractor_shown(x_BCTHW: torch.Tensor, prompts: list[str]) -> np.ndarray:
    """Per clip (B,): at least DISTRACTOR_MIN_PIXELS pixels per frame near a toy colour that is not the
    prompted object's (the distractor always has another colour than the captioned object)."""
    if x_BCTHW.shape[0] != len(prompts):
        raise ValueError(f"got {x_BCTHW.shape[0]} clips for {len(prompts)} prompts")
    rgb_BTHWC = ((x_BCTHW.detach().float().clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 4, 1).cpu().numpy()
    palette = {name: np.asarray(rgb, np.float32) for name, rgb in COLOURS.items()}
    seen = []
    for clip_THWC, prompt in zip(rgb_BTHWC, prompts):
        main = parse_caption(prompt).colour
        near_main_THW = np.linalg.norm(clip_THWC - palette[main], axis=-1) < COLOUR_RADIUS
        near_other_THW = np.stack([np.linalg.norm(clip_THWC - rgb, axis=-1) for name, rgb in palette.items() if name != main]).min(0) < COLOUR_RADIUS
        seen.append((near_other_THW & ~near_main_THW).sum((1, 2)).mean() >= DISTRACTOR_MIN_PIXELS)
    return np.array(seen, dtype=bool)
