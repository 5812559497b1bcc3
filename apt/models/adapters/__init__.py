"""Adapters that make diffusers transformers apt backbones (teacher, generator, discriminator).

``ADAPTERS`` maps ``model.family`` to the adapter class; each family's conventions (layout,
timestep scale, prediction type, text inputs, block outputs) are in its module docstring and in
docs/byo_model.md. An in-house model needs no adapter class: implement the protocol of
``apt.models.backbone`` directly (docs/byo_model.md shows a 30-line example).
"""

from apt.models.adapters.base import (
    AdapterConfig,
    DiffusersAdapter,
    is_diffusers_dir,
    load_adapter_state,
    read_model_config,
)
from apt.models.adapters.cogvideox import CogVideoXAdapter
from apt.models.adapters.flux import FluxAdapter
from apt.models.adapters.hunyuan import HunyuanVideoAdapter
from apt.models.adapters.ltx import LTXAdapter
from apt.models.adapters.sd3 import SD3Adapter
from apt.models.adapters.wan import WanAdapter

ADAPTERS: dict[str, type[DiffusersAdapter]] = {
    "sd3": SD3Adapter,
    "flux": FluxAdapter,
    "wan": WanAdapter,
    "cogvideox": CogVideoXAdapter,
    "ltx": LTXAdapter,
    "hunyuan": HunyuanVideoAdapter,
}


def adapter_class(family: str) -> type[DiffusersAdapter]:
    if family not in ADAPTERS:
        raise ValueError(f"unknown model.family {family!r}; choose from {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[family]


def family_of_dir(local_dir: str) -> str:
    """The adapter family of a local diffusers transformer dir (by its config's _class_name)."""
    _, config = read_model_config(local_dir)
    name = config.get("_class_name")
    for family, cls in ADAPTERS.items():
        if cls.model_class == name:
            return family
    raise ValueError(f"{local_dir} holds a {name or 'non-diffusers'} model; apt has adapters for {', '.join(c.model_class for c in ADAPTERS.values())}")


__all__ = [
    "ADAPTERS", "AdapterConfig", "DiffusersAdapter", "adapter_class", "family_of_dir", "is_diffusers_dir", "load_adapter_state",
    "SD3Adapter", "FluxAdapter", "WanAdapter", "CogVideoXAdapter", "LTXAdapter", "HunyuanVideoAdapter",
]
