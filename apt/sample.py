"""``python -m apt sample``: write one PNG (and GIF for clips) per prompt, plus a grid of all."""

from __future__ import annotations

import re
from pathlib import Path

from apt.inference import load_generator
from apt.media import save_samples


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"


def sample_to_dir(checkpoint: str, prompts: list[str], *, steps: int | None, cfg_scale: float | None, seed: int, frames: int | None, out: str) -> list[Path]:
    """Every argument is checked before the model runs; each error names the argument."""
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"--prompt {i + 1} is empty")
    for name, value in (("--steps", steps), ("--frames", frames)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if cfg_scale is not None and cfg_scale < 0:
        raise ValueError(f"--cfg-scale must be >= 0 (1 = no guidance), got {cfg_scale}")
    gen = load_generator(checkpoint)
    check_prompt_lengths(gen, prompts)
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


def check_prompt_lengths(gen, prompts: list[str]) -> None:
    """A prompt longer than the text encoder's ``text.max_length`` tokens is refused, not cut: the model would
    silently ignore the rest."""
    limit = gen.config.text.max_length
    for i, p in enumerate(prompts):
        n = len(gen.text_encoder.tokenizer(p, truncation=False)["input_ids"])
        if n > limit:
            raise ValueError(f"--prompt {i + 1} is {n} tokens ({len(p)} characters); this model reads at most text.max_length={limit} "
                             "tokens and would ignore the rest: shorten it")
