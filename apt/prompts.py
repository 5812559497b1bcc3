"""The prompts of a run's sample media, from its recipe: ``train.sample_prompts`` or ``train.sample_prompts_file``.

Both training paths (the Lightning Trainer in ``apt.train`` and the DeepSpeed runner) sample them every
``train.sample_every_steps`` and at the end (``apt.lit.callbacks.SampleMedia``).
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

from apt.config import Config, ConfigError


def sample_prompts(c: Config) -> list[str]:
    """The recipe's sample prompts (``train.sample_prompts`` or the lines of ``train.sample_prompts_file``), at most
    ``train.num_sample_prompts`` of them; none, with a warning, when the recipe names none (no sample media)."""
    prompts, path = list(c.train.sample_prompts), c.train.sample_prompts_file
    if path:
        if not Path(path).is_file():
            raise ConfigError(f"train.sample_prompts_file: {path} is not a file (a text file, one prompt per line)")
        prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"train.sample_prompts_file: {path} holds no prompt (one prompt per line)")
    if not prompts:
        rank_zero_warn("train.sample_prompts and train.sample_prompts_file are not set: this run writes no sample media")
    return prompts[: c.train.num_sample_prompts or None]
