"""Sample media people can look at: PNG grids (rows = samples, columns = frames) and GIF clips."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(x_BCTHW: torch.Tensor) -> np.ndarray:
    """[-1, 1] float (B, C, T, H, W) -> uint8 (B, T, H, W, C)."""
    x = ((x_BCTHW.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


def enlarge(img_HWC: np.ndarray, scale: int) -> np.ndarray:
    """Nearest neighbour: every pixel becomes a scale x scale block."""
    return img_HWC.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else img_HWC


def display_scale(height: int, width: int, *, target: int = 64) -> int:
    """Nearest-neighbour enlargement for viewing: small (toy) frames to about ``target`` pixels, real frames as they are."""
    return max(1, target // max(height, width))


SAMPLE_GRID_FRAMES = 8
"""``save_samples``' grid shows at most this many frames of a clip, evenly spaced (its GIF shows them all)."""


def grid_image(clips_BTHWC: np.ndarray, *, scale: int = 4, pad: int = 2, max_frames: int | None = None) -> np.ndarray:
    """One row per clip, one column per frame (at most ``max_frames``, evenly spaced, first and last kept), on a white
    background."""
    B, T, H, W, C = clips_BTHWC.shape
    ts = np.linspace(0, T - 1, max_frames).round().astype(int) if max_frames and T > max_frames else np.arange(T)
    h, w = H * scale, W * scale
    out = np.full((B * (h + pad) + pad, len(ts) * (w + pad) + pad, C), 255, np.uint8)
    for b in range(B):
        for col, t in enumerate(ts):
            y, x = pad + b * (h + pad), pad + col * (w + pad)
            out[y : y + h, x : x + w] = enlarge(clips_BTHWC[b, t], scale)
    return out


def save_png(img_HWC: np.ndarray, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(img_HWC).save(tmp)
    os.replace(tmp, path)


def save_gif(clips_BTHWC: np.ndarray, path: str | Path, *, fps: int = 8, scale: int = 4, columns: int = 4, pad: int = 2) -> None:
    """Clips tiled in a grid, animated over time."""
    B, T, H, W, C = clips_BTHWC.shape
    cols = min(columns, B)
    rows = -(-B // cols)
    h, w = H * scale, W * scale
    frames = []
    for t in range(T):
        canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, C), 255, np.uint8)
        for b in range(B):
            y, x = pad + (b // cols) * (h + pad), pad + (b % cols) * (w + pad)
            canvas[y : y + h, x : x + w] = enlarge(clips_BTHWC[b, t], scale)
        frames.append(canvas)
    save_animation(frames, path, fps=fps)


def save_animation(frames_HWC: list[np.ndarray], path: str | Path, *, fps: int = 8) -> None:
    """uint8 pictures (H, W, C), all of one size, as a looping GIF (written atomically)."""
    images = [Image.fromarray(f) for f in frames_HWC]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.gif")
    images[0].save(tmp, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    os.replace(tmp, path)


def save_samples(x_BCTHW: torch.Tensor, stem: str | Path, *, fps: int = 8) -> list[Path]:
    """Write ``stem.png`` (grid, at most ``SAMPLE_GRID_FRAMES`` frames per clip) and, for clips, ``stem.gif``; small
    frames are enlarged for viewing (``display_scale``), real ones kept at their size. Returns the paths written."""
    clips = to_uint8(x_BCTHW)
    scale = display_scale(*clips.shape[2:4])
    stem = Path(stem)
    paths = [stem.with_suffix(".png")]
    save_png(grid_image(clips, scale=scale, max_frames=SAMPLE_GRID_FRAMES), paths[0])
    if clips.shape[1] > 1:
        paths.append(stem.with_suffix(".gif"))
        save_gif(clips, paths[1], fps=fps, scale=scale)
    return paths
