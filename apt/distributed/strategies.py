"""Map ``train.strategy`` to what Lightning's Trainer takes."""

from __future__ import annotations

from apt.config import Config


def make_strategy(config: Config):
    return config.train.strategy
