"""In-house networks named by a recipe (``model.source: python``), with no change to apt.

    model:
      source: python
      target: my_pkg.nets:build        # imported from sys.path / PYTHONPATH
      kwargs: {dim: 64, depth: 4}      # build(**kwargs) returns an nn.Module speaking the backbone protocol
      path: weights/teacher.safetensors  # optional teacher weights

``build_in_house`` imports the target, builds the network and checks the backbone protocol
(``apt.models.backbone.check_backbone``) on a copy built on the meta device, so a missing member or a
wrong shape fails in one line before any weight is read. ``read_weights`` reads a safetensors file, a
directory of safetensors files, or a torch file with ``torch.load(weights_only=True)`` (nothing is
unpickled beyond tensors and plain containers).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from apt.models.backbone import BackboneForwardError, check_backbone

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def resolve_target(target: str) -> Callable[..., nn.Module]:
    """The callable ``"package.module:name"`` names (``name`` may be dotted: ``module:Class.build``)."""
    key = f"model.target '{target}'"
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{key} must look like 'package.module:callable' (model.source=python)")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{key}: cannot import {module_name} ({e}); put the directory that holds it on PYTHONPATH") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{key}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{key}: {module_name}.{attr} is a {type(obj).__name__}, not a callable that builds the network")
    return obj


def call_target(target: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        net = resolve_target(target)(**kwargs)
    except TypeError as e:
        raise ValueError(f"model.target '{target}' called with model.kwargs {kwargs}: {e}") from None
    if not isinstance(net, nn.Module):
        raise ValueError(f"model.target '{target}' returned a {type(net).__name__}, not an nn.Module")
    return net


def build_in_house(target: str, kwargs: dict[str, Any], *, input_CTHW: tuple[int, int, int, int], text_dim: int) -> nn.Module:
    """Build ``target(**kwargs)`` (random init) after checking the backbone protocol at the run's latent shape
    ``input_CTHW`` and text width ``text_dim``: first on a meta-device copy (shapes only, no compute); a network
    whose forward cannot run on meta tensors is checked with one real forward at batch 1 instead."""
    name = f"model.target '{target}'"
    with torch.device("meta"):
        meta = call_target(target, kwargs)
    try:
        check_backbone(meta, input_CTHW=input_CTHW, text_dim=text_dim, name=name, device="meta")
        meta_ok = True
    except BackboneForwardError:  # an op without a meta kernel, a data-dependent one, or a real bug: run it for real below
        meta_ok = False
    net = call_target(target, kwargs)
    if not meta_ok:
        check_backbone(net, input_CTHW=input_CTHW, text_dim=text_dim, name=name, device="cpu")
    return net


def is_weights_file_or_dir(path: str | Path) -> bool:
    """A safetensors / torch weights file, or a directory of safetensors files that is not an apt checkpoint or run."""
    p = Path(path)
    if p.is_file():
        return p.suffix == ".safetensors" or p.suffix in TORCH_SUFFIXES
    if not p.is_dir() or (p / "config.yaml").exists() or (p / "checkpoints").is_dir():
        return False
    return any(p.glob("*.safetensors"))


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file, a directory of them (merged; a key twice is an error) or a torch
    file (``weights_only=True``; a dict under ``state_dict`` is taken, as many trainers save one)."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {path}")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            part = load_file(str(f))
            twice = sorted(set(part) & set(state))
            if twice:
                raise ValueError(f"{f} repeats key {twice[0]!r} of another file in {path}")
            state.update(part)
        return state
    if p.suffix == ".safetensors":
        return load_file(str(p))
    if p.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: weights must be a .safetensors file, a directory of them, or a torch file ({', '.join(TORCH_SUFFIXES)})")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the unpickler refuses anything but tensors and plain containers
        raise ValueError(f"{path} cannot be read with torch.load(weights_only=True): {str(e).splitlines()[0]}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return obj


def load_state(net: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """``load_state_dict`` (strict), failing in one line that names the first missing / unexpected key or bad shape."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = ([f"{len(missing)} missing (first {missing[0]!r})"] if missing else []) + (
            [f"{len(unexpected)} unexpected (first {unexpected[0]!r})"] if unexpected else [])
        raise ValueError(f"weights {source} do not fit the network: keys {', '.join(parts)}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"weights {source} do not fit the network: {k} is {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the network")
    net.load_state_dict(state)
