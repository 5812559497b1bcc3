"""Build and load the backbone a run uses (teacher, generator, discriminator all go through here).

Two sources (``model.source``):

- ``builtin``: the DiT chosen by ``model.flavour``; weights from apt checkpoints
  (``<name>.safetensors``).
- ``diffusers``: a diffusers transformer of ``model.family`` wrapped by its adapter
  (``apt.models.adapters``). ``model.path`` (a local diffusers dir) gives the architecture and the
  teacher's weights. ``load_backbone(path, name)`` reads a diffusers dir with ``from_pretrained``
  (the teacher / the D init) or, for an apt checkpoint, builds the architecture from
  ``model.path``'s config (no weights read) and loads ``<name>.safetensors`` into it.
"""

from __future__ import annotations

import os

from torch import nn

from apt.checkpoint import load_weights
from apt.config import Config, ConfigError
from apt.models import build_dit


def _check_text_dim(net, config: Config, text_dim: int) -> None:
    if net.config.text_dim != text_dim:
        raise ConfigError(
            f"text.encoder {config.text.encoder!r} gives {text_dim}-wide embeddings but the {net.model_class} "
            f"in model.path={config.model.path} expects {net.config.text_dim}"
        )


def check_text_source(config: Config, net) -> None:
    """A diffusers teacher is conditioned as its pipeline encodes prompts: ``text.encoder`` must be that
    pipeline's directory (``toy-t5`` stays allowed for tiny smoke models: apt's own convention)."""
    from apt.text import TOY_ENCODER
    from apt.text_pipeline import pipeline_family

    enc, fam = config.text.encoder, config.model.family
    if enc == TOY_ENCODER:
        return
    family = pipeline_family(enc) if os.path.isdir(enc) else None
    if family is None:
        raise ConfigError(
            f"text.encoder {enc!r} is not a diffusers pipeline directory; model.family {fam} is conditioned as its "
            f"{net.pipeline_class} encodes prompts ({net.text.summary}): set text.encoder to the pipeline directory "
            f"(model_index.json beside {', '.join(net.text.encoders)}/ and their tokenizers)"
        )
    if family != fam:
        raise ConfigError(f"text.encoder {enc!r} is a {family} pipeline but model.family is {fam}")
    mc = net.model.config
    if fam == "cogvideox" and config.text.max_length != mc.max_text_seq_length:
        raise ConfigError(f"text.max_length={config.text.max_length} but the {net.model_class} in model.path={config.model.path} "
                          f"takes exactly max_text_seq_length={mc.max_text_seq_length} text tokens")


def _diffusers_backbone(config: Config, *, text_dim: int, weights_dir: str | None) -> nn.Module:
    from apt.models.adapters import adapter_class

    cls = adapter_class(config.model.family)
    net = cls.from_pretrained(weights_dir) if weights_dir else cls.from_config_dir(config.model.path)
    check_text_source(config, net)
    _check_text_dim(net, config, text_dim)
    if config.model.gradient_checkpointing:
        net.enable_gradient_checkpointing()
    return net


def build_backbone(config: Config, *, text_dim: int) -> nn.Module:
    """The run's backbone: built-in DiT (random init), or the diffusers model at model.path (its weights)."""
    if config.model.source == "diffusers":
        return _diffusers_backbone(config, text_dim=text_dim, weights_dir=config.model.path)
    net = build_dit(config.model.flavour, text_dim=text_dim)
    net.gradient_checkpointing = config.model.gradient_checkpointing
    net.checkpoint_policy = config.model.checkpoint_policy
    return net


def load_backbone(config: Config, path: str, name: str, *, text_dim: int) -> nn.Module:
    """A backbone with weights ``name`` (e.g. net_ema) from a checkpoint dir or run dir; for
    model.source=diffusers, ``path`` may also be a diffusers model dir (loaded with from_pretrained)."""
    if config.model.source == "diffusers":
        from apt.models.adapters import is_diffusers_dir, load_adapter_state

        if is_diffusers_dir(path):
            return _diffusers_backbone(config, text_dim=text_dim, weights_dir=path)
        state = load_weights(path, name)  # FileNotFoundError first: callers fall back on other names
        net = _diffusers_backbone(config, text_dim=text_dim, weights_dir=None)
        load_adapter_state(net, state, source=f"{name} in {path}")
        return net
    net = build_backbone(config, text_dim=text_dim)
    try:
        net.load_state_dict(load_weights(path, name))
    except RuntimeError as e:
        raise ValueError(f"weights {name} in {path} do not fit model flavour '{config.model.flavour}': {str(e).splitlines()[0]}") from None
    return net


def weights_available(config: Config, path: str, name: str) -> bool:
    """Whether ``load_backbone(config, path, name)`` finds weights (for pre-flight path checks)."""
    from apt.checkpoint import resolve_weights_dir

    if config.model.source == "diffusers":
        from apt.models.adapters import is_diffusers_dir

        if is_diffusers_dir(path):
            return True
    try:
        resolve_weights_dir(path, name)
        return True
    except FileNotFoundError:
        return False
