"""The demo's side-by-side picture: for each prompt, the report's rows one under the other, labelled.

One group per prompt, the prompt written over it; in a group, one row per report row (its name at the
left), the row's clip frame by frame to the right (the GIF: one animated tile per row). Clips are
enlarged by nearest neighbour (``SCALE``: a 16x16 clip becomes 128x128 pixels), so each generated pixel
stays a visible square and nothing is smoothed that the models did not draw.

Shape legend: P prompts, R rows, T frames, H height, W width, C channels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from apt.media import enlarge, save_animation, save_png

SCALE = 8
"""Nearest-neighbour enlargement of every clip pixel."""
PAD = 4
"""White pixels between tiles."""
GAP = 24
"""White pixels between prompt groups and around the picture."""
FONT_SIZE = 18
TITLE_HEIGHT = 30
"""The prompt's line over each group."""
LABEL_MIN_WIDTH = 200
"""The row names' column (wider when a name needs it)."""


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font, smaller but legible
        return ImageFont.load_default()


def text_width(text: str, font=None) -> int:
    font = font or _font()
    left, _, right, _ = font.getbbox(text)
    return int(np.ceil(right - left))


def side_by_side_image(clips_PRTHWC: np.ndarray, row_names: list[str], prompts: list[str], *, groups_per_line: int = 2) -> np.ndarray:
    """uint8 (P, R, T, H, W, C) clips -> one labelled uint8 picture (height, width, C) on white."""
    P, R, T, H, W, C = clips_PRTHWC.shape
    if len(row_names) != R or len(prompts) != P:
        raise ValueError(f"{P} prompts x {R} rows of clips, but {len(prompts)} prompts and {len(row_names)} row names")
    font = _font()
    tile_h, tile_w = H * SCALE, W * SCALE
    label_w = max(LABEL_MIN_WIDTH, max(text_width(n, font) for n in row_names) + 2 * PAD)
    group_w = max(label_w + T * (tile_w + PAD), max(text_width(p, font) for p in prompts) + PAD)
    group_h = TITLE_HEIGHT + R * (tile_h + PAD)
    cols = min(groups_per_line, P)
    lines = -(-P // cols)
    canvas = Image.new("RGB", (2 * GAP + cols * group_w + (cols - 1) * GAP, 2 * GAP + lines * group_h + (lines - 1) * GAP), "white")
    draw = ImageDraw.Draw(canvas)
    for p in range(P):
        x0, y0 = GAP + (p % cols) * (group_w + GAP), GAP + (p // cols) * (group_h + GAP)
        draw.text((x0, y0 + (TITLE_HEIGHT - FONT_SIZE) // 2), prompts[p], fill="black", font=font)
        for r in range(R):
            y = y0 + TITLE_HEIGHT + r * (tile_h + PAD)
            draw.text((x0, y + (tile_h - FONT_SIZE) // 2), row_names[r], fill="black", font=font)
            for t in range(T):
                tile = Image.fromarray(enlarge(clips_PRTHWC[p, r, t], SCALE))
                canvas.paste(tile, (x0 + label_w + t * (tile_w + PAD), y))
    return np.asarray(canvas)


def save_side_by_side(clips_PRTHWC: np.ndarray, row_names: list[str], prompts: list[str], out_dir: str | Path, *, fps: int = 8) -> list[Path]:
    """``side_by_side.png`` (frames left to right) and ``side_by_side.gif`` (one animated tile per row, four
    prompt groups per line) in ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    png, gif = out_dir / "side_by_side.png", out_dir / "side_by_side.gif"
    save_png(side_by_side_image(clips_PRTHWC, row_names, prompts), png)
    T = clips_PRTHWC.shape[2]
    frames = [side_by_side_image(clips_PRTHWC[:, :, t : t + 1], row_names, prompts, groups_per_line=4) for t in range(T)]
    save_animation(frames, gif, fps=fps)
    return [png, gif]
