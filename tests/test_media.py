"""apt.media: sample grids and GIFs stay at a viewable size for toy and real frames alike."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from apt.media import SAMPLE_GRID_FRAMES, display_scale, grid_image, save_samples


def test_toy_frames_are_enlarged_and_real_frames_kept():
    assert (display_scale(16, 16), display_scale(32, 32), display_scale(480, 832), display_scale(16, 16, target=128)) == (4, 2, 1, 8)


def test_save_samples_sizes(tmp_path):
    pad = 2
    png, gif = save_samples(torch.rand(2, 3, 4, 16, 16) * 2 - 1, tmp_path / "toy")  # 4 frames: all shown, 4x
    assert Image.open(png).size == (4 * (64 + pad) + pad, 2 * (64 + pad) + pad)
    assert Image.open(gif).size == (2 * (64 + pad) + pad, 64 + 2 * pad)
    png, gif = save_samples(torch.rand(2, 3, 20, 48, 66) * 2 - 1, tmp_path / "real")  # 20 frames: 8 in the grid, 1x
    assert Image.open(png).size == (SAMPLE_GRID_FRAMES * (66 + pad) + pad, 2 * (48 + pad) + pad)
    assert Image.open(gif).n_frames == 20
    (still,) = save_samples(torch.zeros(1, 3, 1, 16, 16), tmp_path / "image")
    assert still.suffix == ".png"


def test_grid_keeps_first_and_last_frames():
    clips = np.stack([np.full((1, 1, 3), t, np.uint8) for t in range(20)])[None]  # (1, 20, 1, 1, 3), frame t has value t
    grid = grid_image(clips, scale=1, pad=0, max_frames=5)
    assert grid[0, :, 0].tolist() == [0, 5, 10, 14, 19]
    assert grid_image(clips, scale=1, pad=0).shape[1] == 20
