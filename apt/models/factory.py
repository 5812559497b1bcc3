"""Build and load the backbone a run uses (teacher, generator, discriminator all go through here).

The built-in DiT is chosen by ``model.flavour``; its weights load from apt checkpoints
(``<name>.safetensors``).
"""

from __future__ import annotations

from torch import nn

from apt.checkpoint import load_weights
from apt.config import Config
from apt.models import build_dit


def build_backbone(config: Config, *, text_dim: int) -> nn.Module:
    net = build_dit(config.model.flavour, text_dim=text_dim)
    net.gradient_checkpointing = config.model.gradient_checkpointing
    return net


def load_backbone(config: Config, path: str, name: str, *, text_dim: int) -> nn.Module:
    """A backbone with weights ``name`` (e.g. net_ema) from a checkpoint dir or run dir."""
    net = build_backbone(config, text_dim=text_dim)
    try:
        net.load_state_dict(load_weights(path, name))
    except RuntimeError as e:
        raise ValueError(f"weights {name} in {path} do not fit model flavour '{config.model.flavour}': {str(e).splitlines()[0]}") from None
    return net
