"""Build and load the backbone a run uses (teacher, generator, discriminator all go through here).

Three sources (``model.source``):

- ``builtin``: the DiT chosen by ``model.flavour``; weights from apt checkpoints
  (``<name>.safetensors``).
- ``diffusers``: a diffusers transformer of ``model.family`` wrapped by its adapter
  (``apt.models.adapters``). ``model.path`` (a local diffusers dir) gives the architecture and the
  teacher's weights. ``load_backbone(path, name)`` reads a diffusers dir with ``from_pretrained``
  (the teacher / the D init) or, for an apt checkpoint, builds the architecture from
  ``model.path``'s config (no weights read) and loads ``<name>.safetensors`` into it.
- ``python``: an in-house network, ``model.target(**model.kwargs)``, checked against the backbone
  protocol when built (``apt.models.in_house``); weights from ``model.path`` (optional: random init
  otherwise), and ``load_backbone(path, name)`` reads a safetensors file / directory or torch file, or
  an apt checkpoint's ``<name>.safetensors``.

A LoRA run's checkpoint (``apt.lora``) holds adapters only: ``load_backbone`` rebuilds its product as
base (``lora.base`` of its config.yaml) + adapters, merged into a plain network.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from apt.checkpoint import load_weights, resolve_weights_dir
from apt.config import Config, ConfigError, config_from_yaml
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


def causal_overrides(config: Config) -> dict:
    """The DiTConfig fields of ``model.causal_chunk_frames`` (none when off: the flavour as registered)."""
    m = config.model
    if not m.causal_chunk_frames:
        return {}
    return {"causal_chunk_frames": m.causal_chunk_frames, "sink_chunks": m.sink_chunks, "window_chunks": m.window_chunks,
            "clean_context": m.clean_context}


def _python_backbone(config: Config, *, text_dim: int, weights: dict[str, torch.Tensor] | None, source: str = "") -> nn.Module:
    from apt.models.in_house import build_in_house, load_state

    m, d = config.model, config.data
    net = build_in_house(m.target, m.kwargs, input_CTHW=(d.channels, d.frames, d.height, d.width), text_dim=text_dim)
    if weights is not None:
        load_state(net, weights, source=source)
    if m.gradient_checkpointing:
        if callable(getattr(net, "enable_gradient_checkpointing", None)):
            net.enable_gradient_checkpointing()
        elif hasattr(net, "gradient_checkpointing"):
            net.gradient_checkpointing = True
        else:
            raise ConfigError(f"model.gradient_checkpointing=true, but the network of model.target '{m.target}' has neither "
                              "enable_gradient_checkpointing() nor a gradient_checkpointing attribute")
    return net


def build_backbone(config: Config, *, text_dim: int) -> nn.Module:
    """The run's backbone: built-in DiT (random init), the diffusers model at model.path (its weights), or the
    in-house network of model.target (model.path's weights, or random init)."""
    if config.model.source == "diffusers":
        return _diffusers_backbone(config, text_dim=text_dim, weights_dir=config.model.path)
    if config.model.source == "python":
        from apt.models.in_house import read_weights

        path = config.model.path
        return _python_backbone(config, text_dim=text_dim, weights=read_weights(path) if path else None, source=f"model.path={path}")
    net = build_dit(config.model.flavour, text_dim=text_dim, **causal_overrides(config))
    net.gradient_checkpointing = config.model.gradient_checkpointing
    net.checkpoint_policy = config.model.checkpoint_policy
    return net


def load_backbone(config: Config, path: str, name: str, *, text_dim: int) -> nn.Module:
    """A backbone with weights ``name`` (e.g. net_ema) from a checkpoint dir or run dir; for
    model.source=diffusers, ``path`` may also be a diffusers model dir (loaded with from_pretrained); for
    model.source=python, a weights file or directory. A LoRA run's checkpoint gives its base + adapters, merged."""
    from apt import lora

    lora_run = lora.run_config(path)
    if lora_run is not None:
        return _lora_product(config, lora_run, path, name, text_dim=text_dim)
    if config.model.source == "python":
        from apt.models.in_house import is_weights_file_or_dir, read_weights

        state = read_weights(path) if is_weights_file_or_dir(path) else load_weights(path, name)
        return _python_backbone(config, text_dim=text_dim, weights=state, source=f"{name} in {path}")
    if config.model.source == "diffusers":
        from apt.models.adapters import is_diffusers_dir, load_adapter_state

        if is_diffusers_dir(path):
            return _diffusers_backbone(config, text_dim=text_dim, weights_dir=path)
        state = load_weights(path, name)  # FileNotFoundError first: callers fall back on other names
        net = _diffusers_backbone(config, text_dim=text_dim, weights_dir=None)
        load_adapter_state(net, state, source=f"{name} in {path}")
        return net
    net = build_backbone(config, text_dim=text_dim)
    state = load_weights(path, name)
    check_same_context(config, resolve_weights_dir(path, name), f"{name} in {path}")
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"weights {name} in {path} do not fit model flavour '{config.model.flavour}': {str(e).splitlines()[0]}") from None
    return net


def check_same_context(config: Config, checkpoint_dir, source: str) -> None:
    """A causal checkpoint trained with one ``model.clean_context`` computes another function under the other (its cache
    holds other keys and values; the switch adds no weights, so loading alone would not notice): refuse the mismatch."""
    saved_yaml = Path(checkpoint_dir) / "config.yaml"
    if not config.model.causal_chunk_frames or not saved_yaml.exists():
        return
    saved = config_from_yaml(saved_yaml).model
    if saved.causal_chunk_frames and saved.clean_context != config.model.clean_context:
        raise ValueError(f"{source} was trained with model.clean_context={str(saved.clean_context).lower()}; this run has "
                         f"model.clean_context={str(config.model.clean_context).lower()} (set it to match)")


def load_full_weights(config: Config, path: str, *, text_dim: int) -> nn.Module:
    """A full network from ``path``: a run's product (generator_ema, else net_ema) or a model dir / weights file."""
    from apt.lora import BASE_NAMES

    for name in BASE_NAMES[:-1]:
        try:
            return load_backbone(config, path, name, text_dim=text_dim)
        except FileNotFoundError:
            pass
    return load_backbone(config, path, BASE_NAMES[-1], text_dim=text_dim)


def _lora_product(config: Config, lora_run: Config, path: str, name: str, *, text_dim: int) -> nn.Module:
    """Network ``name`` of a LoRA run: its base (``lora.base``) + that adapter, merged into a plain network."""
    from apt import lora

    stem, adapter = lora.product_file(name)
    state = load_weights(path, stem)  # FileNotFoundError first: callers fall back on other names
    base = lora_run.lora.base
    if not base:
        raise ValueError(f"{path} is a LoRA run whose config.yaml records no lora.base (the weights its adapters sit on)")
    if lora.run_config(base) is not None:
        raise ValueError(f"lora.base {base} of {path} is itself a LoRA run; a base must hold full weights")
    net = load_full_weights(config, base, text_dim=text_dim)
    lora.add_adapters(net, lora_run.lora, config.model.source, adapters=(lora.TRAINED,))
    lora.load_adapter(net, lora.adapter_state(state, adapter), lora.TRAINED, source=f"{stem}.safetensors ({adapter}) in {path}")
    return lora.merge(net).requires_grad_(True)


def weights_available(config: Config, path: str, name: str) -> bool:
    """Whether ``load_backbone(config, path, name)`` finds weights (for pre-flight path checks)."""
    from apt import lora
    from apt.checkpoint import resolve_weights_dir

    if lora.run_config(path) is not None:
        name = lora.product_file(name)[0]
    elif config.model.source == "python":
        from apt.models.in_house import is_weights_file_or_dir

        if is_weights_file_or_dir(path):
            return True
    if config.model.source == "diffusers":
        from apt.models.adapters import is_diffusers_dir

        if is_diffusers_dir(path):
            return True
    try:
        resolve_weights_dir(path, name)
        return True
    except FileNotFoundError:
        return False


def load_bidirectional(config: Config, path: str, name: str, *, text_dim: int) -> nn.Module:
    """The run's built-in DiT flavour in bidirectional mode (whatever ``model.causal_chunk_frames``) with weights ``name``
    of a bidirectional checkpoint at ``path`` (e.g. a causal run's distribution-matching teacher); a causal
    checkpoint is refused by name."""
    bidirectional = copy.deepcopy(config)
    bidirectional.model.causal_chunk_frames = 0
    saved_yaml = resolve_weights_dir(path, name) / "config.yaml"
    if saved_yaml.exists() and config_from_yaml(saved_yaml).model.causal_chunk_frames:
        raise ValueError(f"weights {name} in {path} are a causal model (model.causal_chunk_frames > 0 in its config.yaml); "
                         "a bidirectional checkpoint is needed here")
    return load_backbone(bidirectional, path, name, text_dim=text_dim)


def load_causal_from_bidirectional(config: Config, path: str, name: str, *, text_dim: int) -> nn.Module:
    """The run's causal DiT (``model.causal_chunk_frames`` > 0) initialised from a bidirectional checkpoint: every weight
    of the bidirectional model loads unchanged; the input-recycling layer, which it lacks, keeps its zero init (AAPT's
    causal adaptation starts from the bidirectional model's function). A causal checkpoint of the same shape loads
    whole (adaptation continued, e.g. on another world)."""
    net = build_backbone(config, text_dim=text_dim)
    state = load_weights(path, name)
    own = net.state_dict()
    added = sorted(set(own) - set(state))
    if added not in (["recycle_embed.bias", "recycle_embed.weight"], []):
        unexpected = sorted(set(state) - set(own))
        raise ValueError(f"weights {name} in {path} are not a bidirectional '{config.model.flavour}' DiT: missing {added or 'nothing'}, "
                         f"unexpected {unexpected or 'nothing'}")
    try:
        net.load_state_dict({**state, **{k: own[k] for k in added}})
    except RuntimeError as e:
        raise ValueError(f"weights {name} in {path} do not fit model flavour '{config.model.flavour}': {str(e).splitlines()[0]}") from None
    return net
