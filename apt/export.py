"""Export a trained one-step generator back to the format it came in (diffusers ``save_pretrained``).

``export_diffusers(checkpoint, out_dir)`` takes an apt checkpoint (or run dir) of a
``model.source: diffusers`` run, loads its product — ``generator_ema`` for an APT run, ``net_ema``
for a distillation run (apt.inference.PRODUCT) — into the wrapped diffusers transformer of
``model.path``'s architecture and writes it with ``save_pretrained``: the stock diffusers class
reloads it (``WanTransformer3DModel.from_pretrained(out_dir)``) and drops into the family's
pipeline as ``transformer=``. Beside it, ``apt_one_step.json`` and ``README.md`` give the
one-step settings: one Euler step from the final timestep (sigma 1 -> 0; diffusers timestep
``timestep_at_T``), no classifier-free guidance (guidance_scale 1: CFG was baked in by
distillation).
"""

from __future__ import annotations

import json
from pathlib import Path

from apt.checkpoint import load_weights
from apt.config import config_from_yaml
from apt.inference import PRODUCT, resolve_checkpoint

# What one step means in each family's own pipeline (the scheduler's first and only timestep).
ONE_STEP = {
    "sd3": {"pipeline": "StableDiffusion3Pipeline", "scheduler": "FlowMatchEulerDiscreteScheduler", "timestep_at_T": 1000.0},
    "flux": {"pipeline": "FluxPipeline", "scheduler": "FlowMatchEulerDiscreteScheduler", "timestep_at_T": 1.0},
    "wan": {"pipeline": "WanPipeline", "scheduler": "FlowMatchEulerDiscreteScheduler (replace the default UniPC: one Euler step)", "timestep_at_T": 1000.0},
    "cogvideox": {"pipeline": "CogVideoXPipeline", "scheduler": "CogVideoXDDIMScheduler (trailing spacing: timestep 999)", "timestep_at_T": 999.0},
    "ltx": {"pipeline": "LTXPipeline", "scheduler": "FlowMatchEulerDiscreteScheduler", "timestep_at_T": 1000.0},
    "hunyuan": {"pipeline": "HunyuanVideoPipeline", "scheduler": "FlowMatchEulerDiscreteScheduler", "timestep_at_T": 1000.0},
}


def export_diffusers(checkpoint: str | Path, out_dir: str | Path, *, weights: str | None = None) -> Path:
    """Write the checkpoint's EMA generator as a diffusers transformer under out_dir; returns out_dir."""
    from apt.models.adapters import adapter_class, load_adapter_state

    ckpt = resolve_checkpoint(checkpoint)
    config = config_from_yaml(ckpt / "config.yaml")
    if config.model.source != "diffusers":
        raise ValueError(f"{ckpt} is a model.source={config.model.source} run; export_diffusers needs a diffusers-source run")
    if config.stage not in ("distill", "apt"):
        raise ValueError(f"{ckpt} is a {config.stage} run; only one-step generators (distill, apt) are exported")
    name = weights or PRODUCT[config.stage]
    net = adapter_class(config.model.family).from_config_dir(config.model.path)
    load_adapter_state(net, load_weights(ckpt, name), source=f"{name} in {ckpt}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out)
    fam = config.model.family
    settings = {
        "family": fam,
        "diffusers_class": net.model_class,
        "source_checkpoint": str(ckpt),
        "weights": name,
        "stage": config.stage,
        "num_inference_steps": 1,
        "sigmas": [1.0],
        "guidance_scale": 1.0,
        "apt_time": 1.0,
        "latent_shape_CTHW": [config.data.channels, config.data.frames, config.data.height, config.data.width],
        "base_transformer": config.model.path,
        "vae": config.model.vae,
        "text_encoder": config.text.encoder,
        **ONE_STEP[fam],
    }
    (out / "apt_one_step.json").write_text(json.dumps(settings, indent=2))
    (out / "README.md").write_text(_readme(settings))
    return out


def _readme(s: dict) -> str:
    return f"""# One-step {s['family']} generator (apt, {s['stage']} stage)

Exported by `apt.export.export_diffusers` from `{s['source_checkpoint']}` (weights `{s['weights']}`).
Load with the stock diffusers class and use it as the transformer of a `{s['pipeline']}`:

```python
from diffusers import {s['diffusers_class']}
transformer = {s['diffusers_class']}.from_pretrained("<this directory>")
```

One-step settings (apt_one_step.json): a single step from the final timestep, sigma 1 -> 0
(diffusers timestep {s['timestep_at_T']:g}), scheduler {s['scheduler']},
`num_inference_steps=1`, `guidance_scale=1.0` (no classifier-free guidance: it was distilled in).
The sample is `z - v(z, T)` for noise z of latent shape (C, T, H, W) = {tuple(s['latent_shape_CTHW'])}.
The generator also works zero-shot at 2 steps (APT, arXiv 2501.08316).
"""
