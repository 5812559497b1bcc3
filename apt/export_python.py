"""Export the one-step generator of an in-house network run (``model.source: python``).

``export_python(checkpoint, out_dir)`` writes what a user needs to rebuild the generator without apt's
training code: ``model.safetensors`` (the product's state dict -- ``generator_ema`` of an APT run,
``net_ema`` of a distillation run; a LoRA run's adapters merged in) and ``apt_model.json`` with the
factory and its keyword arguments (``model.target``, ``model.kwargs``) and the one-step settings.
``load_exported(out_dir)`` rebuilds it: import the target, call it with the kwargs, load the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from apt.checkpoint import save_weights
from apt.config import config_from_yaml
from apt.inference import PRODUCT, resolve_checkpoint
from apt.models import factory
from apt.text import TextEncoder

WEIGHTS_FILE = "model.safetensors"
META_FILE = "apt_model.json"


def export_python(checkpoint: str | Path, out_dir: str | Path, *, weights: str | None = None) -> Path:
    """Write the run's product as ``model.safetensors`` + ``apt_model.json`` under out_dir; returns out_dir."""
    ckpt = resolve_checkpoint(checkpoint)
    config = config_from_yaml(ckpt / "config.yaml")
    if config.model.source != "python":
        raise ValueError(f"{ckpt} is a model.source={config.model.source} run; export_python needs a model.source=python run")
    if config.stage not in ("distill", "apt"):
        raise ValueError(f"{ckpt} is a {config.stage} run; only one-step generators (distill, apt) are exported")
    name = weights or PRODUCT[config.stage]
    text_dim = TextEncoder.load(config.text.encoder, max_length=config.text.max_length).dim
    net = factory.load_backbone(config, str(ckpt), name, text_dim=text_dim)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(net.state_dict(), out / WEIGHTS_FILE)
    meta = {
        "source": "python",
        "target": config.model.target,
        "kwargs": config.model.kwargs,
        "weights_file": WEIGHTS_FILE,
        "source_checkpoint": str(ckpt),
        "weights": name,
        "stage": config.stage,
        "lora_merged": config.lora.rank > 0,
        "num_inference_steps": 1,
        "apt_time": 1.0,
        "guidance_scale": 1.0,
        "latent_shape_CTHW": [config.data.channels, config.data.frames, config.data.height, config.data.width],
        "text_encoder": config.text.encoder,
        "text_max_length": config.text.max_length,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    (out / "README.md").write_text(_readme(meta))
    return out


def load_exported(out_dir: str | Path) -> nn.Module:
    """The exported network: ``target(**kwargs)`` with ``model.safetensors`` loaded (the target must be importable)."""
    from safetensors.torch import load_file

    from apt.models.in_house import call_target, load_state

    d = Path(out_dir)
    if not (d / META_FILE).exists():
        raise FileNotFoundError(f"{d} has no {META_FILE} (written by apt.export_python.export_python)")
    meta = json.loads((d / META_FILE).read_text())
    net = call_target(meta["target"], meta["kwargs"])
    load_state(net, load_file(str(d / meta["weights_file"])), source=str(d / meta["weights_file"]))
    return net


def _readme(m: dict) -> str:
    return f"""# One-step generator of an in-house network (apt, {m['stage']} stage)

Exported by `apt.export_python.export_python` from `{m['source_checkpoint']}` (weights `{m['weights']}`{', LoRA merged' if m['lora_merged'] else ''}).
Rebuild it with the network's own code (no apt training code needed):

```python
from safetensors.torch import load_file
from {m['target'].split(':')[0]} import {m['target'].split(':')[1].split('.')[0]}
net = {m['target'].split(':')[1]}(**{m['kwargs']!r})
net.load_state_dict(load_file("{m['weights_file']}"))
```

or `apt.export_python.load_exported("<this directory>")`. One step: `x0 = z - net(z, t=1, text)` for noise z of
shape (B, C, T, H, W) = (B, {', '.join(str(v) for v in m['latent_shape_CTHW'])}), text from `{m['text_encoder']}`
(max {m['text_max_length']} tokens), no classifier-free guidance (it was distilled in).
"""
