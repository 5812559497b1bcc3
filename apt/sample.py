"""``python -m apt sample``: write one PNG (and GIF for clips) per prompt, plus a grid of all."""

from __future__ import annotations

import re
from pathlib import Path

from apt.inference import load_generator
from apt.media import save_samples


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"


def sample_to_dir(checkpoint: str, prompts: list[str], *, steps: int | None, cfg_scale: float | None, seed: int, frames: int | None, out: str) -> list[Path]:
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"--prompt {i + 1} is empty")
    gen = load_generator(checkpoint)
    if frames is not None:
        gen.net.check_input_shape((1, gen.config.data.channels, frames, gen.height, gen.width))
    seeds = [seed + i for i in range(len(prompts))]
    x = gen.generate_tensor(prompts, seeds, steps=steps, cfg_scale=cfg_scale, frames=frames)
    out_dir = Path(out)
    paths: list[Path] = []
    for i, p in enumerate(prompts):
        paths += save_samples(x[i : i + 1], out_dir / f"{i:03d}-{_slug(p)}")
    if len(prompts) > 1:
        paths += save_samples(x, out_dir / "grid")
    return paths
