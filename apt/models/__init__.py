"""Models: the built-in DiT, its flavours, and the backbone protocol every network follows."""

from apt.models.backbone import Backbone, TextCond, readout_layers, tap_hidden_states
from apt.models.dit import DiT, DiTConfig
from apt.models.registry import FLAVOURS, build_dit

__all__ = ["Backbone", "TextCond", "readout_layers", "tap_hidden_states", "DiT", "DiTConfig", "FLAVOURS", "build_dit"]
