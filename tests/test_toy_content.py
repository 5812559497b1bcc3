"""Pixel statistics of toy clips (apt.toy.content) on real clips with and without what they measure."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apt.toy import world
from apt.toy.content import distractor_visible, high_frequency_share


def real_clips(n: int, monkeypatch=None, distractor_radius=None):
    if distractor_radius is not None:
        monkeypatch.setattr(world, "DISTRACTOR_RADIUS", distractor_radius)
    samples = [world.make_sample(i, 5, 4) for i in range(n)]
    x = torch.from_numpy(np.stack([s["pixels"] for s in samples])).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    return x, [s["caption"] for s in samples]


def test_distractor_visible_counts_the_uncaptioned_object(monkeypatch):
    x, captions = real_clips(64)
    with_it = distractor_visible(x, captions)
    assert 0.6 < with_it < 1.0  # drawn under the captioned object and partly out of frame, so not always seen
    x_none, captions_none = real_clips(64, monkeypatch, distractor_radius=(-5.0, -5.0))  # same clips, no distractor
    assert captions_none == captions and distractor_visible(x_none, captions_none) == 0.0
    with pytest.raises(ValueError, match="64 clips for 63 prompts"):
        distractor_visible(x, captions[:-1])


def test_blur_lowers_the_high_frequency_share():
    x, _ = real_clips(32)
    B, C, T, H, W = x.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
    box = torch.full((C, 1, 3, 3), 1 / 9)
    blurred = F.conv2d(F.pad(frames, (1, 1, 1, 1), mode="replicate"), box, groups=C).reshape(B, T, C, H, W).permute(0, 2, 1, 3, 4)
    sharp, soft = high_frequency_share(x), high_frequency_share(blurred)
    assert 0 < soft < sharp / 2 < 1
    assert high_frequency_share(torch.zeros(2, 3, 1, 16, 16)) == 0.0  # a flat frame has no power beyond its mean
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1  # all power at 1/2 cycle per pixel
    assert high_frequency_share(checker.expand(1, 3, 1, 16, 16)) == pytest.approx(1.0)
