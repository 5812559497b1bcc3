"""Export a LoRA run's product (``apt.lora``): its EMA adapters in the format stock tools load, or merged.

diffusers families (``model.source: diffusers``):

- adapters (``--lora``): ``OUT/pytorch_lora_weights.safetensors``, written by the family pipeline's own
  ``save_lora_weights`` (keys ``transformer.<module>.lora_A.weight``, the peft adapter config in the
  safetensors metadata), so ``pipe.load_lora_weights(OUT)`` or
  ``transformer.load_lora_adapter(OUT, prefix="transformer")`` reads it as any diffusers LoRA;
- merged (``--merge``): the base transformer with the adapters loaded by diffusers' ``load_lora_adapter``,
  fused (``fuse_lora``) and unloaded, written with ``save_pretrained``: a full transformer.

built-in DiT / in-house networks: adapters as peft writes them (``adapter_model.safetensors`` +
``adapter_config.json``); merged, a checkpoint directory (``<product>.safetensors`` + ``config.yaml``
without LoRA) that ``python -m apt sample`` reads (in-house: plus ``apt_model.json``, ``apt.export_python``).

Beside each, ``apt_lora.json`` names the base the adapters belong on (``lora.base``: for the stock pipeline,
the original model directory; a LoRA over a distilled apt checkpoint needs that checkpoint, or ``--merge``),
rank, alpha, target modules and the one-step settings. ``export_route`` is ``python -m apt export``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from apt import lora
from apt.checkpoint import load_weights, save_weights
from apt.config import Config, LoraConfig, config_from_yaml, save_config
from apt.inference import PRODUCT, resolve_checkpoint

PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "wan": "WanPipeline", "cogvideox": "CogVideoXPipeline",
             "ltx": "LTXPipeline", "hunyuan": "HunyuanVideoPipeline"}
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE


def export_route(checkpoint: str | Path, out_dir: str | Path, *, lora: bool = False, merge: bool = False, weights: str | None = None,
                 transformer_only: bool = False) -> Path:
    """``python -m apt export``: a LoRA run needs ``lora`` (adapters) or ``merge`` (full model); other runs are
    exported whole (diffusers: ``apt.export.export_diffusers``; in-house: ``apt.export_python.export_python``)."""
    ckpt = resolve_checkpoint(checkpoint)
    config = config_from_yaml(ckpt / "config.yaml")
    if lora and merge:
        raise ValueError("--lora writes the adapters, --merge a full model with them folded in: pass one")
    if transformer_only and (lora or merge or config.model.source != "diffusers"):
        raise ValueError("--transformer-only applies to the full export of a diffusers-based run (a LoRA export or an in-house network "
                         "writes no pipeline anyway)")
    if config.lora.rank > 0:
        if not (lora or merge):
            raise ValueError(f"{ckpt} is a LoRA run (lora.rank={config.lora.rank}): pass --lora for its adapters, or --merge for a full model")
        return export_lora(ckpt, out_dir, merge=merge, weights=weights)
    if lora or merge:
        raise ValueError(f"{ckpt} is not a LoRA run (lora.rank=0): export it without --lora / --merge")
    if config.model.source == "python":
        from apt.export_python import export_python

        return export_python(ckpt, out_dir, weights=weights)
    from apt.export import export_diffusers

    return export_diffusers(ckpt, out_dir, weights=weights, transformer_only=transformer_only)


def export_lora(checkpoint: str | Path, out_dir: str | Path, *, merge: bool = False, weights: str | None = None) -> Path:
    """Write the EMA adapters of a LoRA run (``merge``: folded into its base, a full model) under out_dir; returns out_dir."""
    ckpt = resolve_checkpoint(checkpoint)
    config = config_from_yaml(ckpt / "config.yaml")
    if config.lora.rank == 0:
        raise ValueError(f"{ckpt} is not a LoRA run (lora.rank=0); export the full model with `python -m apt export`")
    if config.stage not in ("distill", "apt"):
        raise ValueError(f"{ckpt} is a {config.stage} run; only one-step generators (distill, apt) are exported")
    name = weights or PRODUCT[config.stage]
    stem, adapter = lora.product_file(name)
    state = lora.adapter_state(load_weights(ckpt, stem), adapter)  # peft format: <module>.lora_A.weight
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_config = lora.peft_config(config.lora, config.model.source)
    if config.model.source == "diffusers":
        state = {k.removeprefix("model."): v for k, v in state.items()}  # the adapter wraps the diffusers model as .model
        fmt = _diffusers_merged(config, state, peft_config, out) if merge else _diffusers_adapters(config, state, peft_config, out)
    else:
        fmt = _apt_merged(config, ckpt, name, out) if merge else _peft_adapters(state, peft_config, out)
    info = {
        "format": fmt,
        "merged": merge,
        "base": config.lora.base,
        "base_is_diffusers_dir": _is_diffusers_dir(config.lora.base) if config.model.source == "diffusers" else False,
        "rank": config.lora.rank,
        "alpha": config.lora.alpha or config.lora.rank,
        "target_modules": lora.target_modules(config.lora, config.model.source),
        "source_checkpoint": str(ckpt),
        "weights": name,
        "stage": config.stage,
        "model_source": config.model.source,
        "family": config.model.family,
        **(_one_step_call(config, out) if config.model.source == "diffusers" else {"num_inference_steps": 1}),
        "latent_shape_CTHW": [config.data.channels, config.data.frames, config.data.height, config.data.width],
        "text_encoder": config.text.encoder,
    }
    (out / "apt_lora.json").write_text(json.dumps(info, indent=2))
    (out / "README.md").write_text(_readme(info))
    return out


def _one_step_call(config: Config, out: Path) -> dict:
    """The stock pipeline's one-step call, as ``python -m apt export`` writes it for a full model
    (``apt.export``): a one-step scheduler saved under ``out/scheduler`` and the call's keyword arguments
    (``call``; needs the run's VAE for the pixel size, else only the scheduler is written)."""
    from apt.export import base_pipeline_dir, export_scheduler, pipeline_call
    from apt.models.adapters import adapter_class

    base = base_pipeline_dir(config)
    scheduler = export_scheduler(config, base)
    scheduler.save_pretrained(str(out / "scheduler"))
    settings = {"scheduler": type(scheduler).__name__, "base_pipeline": None if base is None else str(base),
                "diffusers_class": adapter_class(config.model.family).model_class}
    if config.model.vae:
        import torch

        from apt.codecs import LatentCodec

        with torch.device("meta"):  # only the config and the adapter's settings are read: no memory for the weights
            net = adapter_class(config.model.family).from_config_dir(config.model.path)
        settings["call"] = pipeline_call(config, net, LatentCodec.load(config.model.vae))
    return settings


def _is_diffusers_dir(path: str) -> bool:
    from apt.models.adapters import is_diffusers_dir

    return is_diffusers_dir(path)


def _metadata(peft_config) -> dict:
    meta = peft_config.to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}


def _diffusers_adapters(config: Config, state: dict, peft_config, out: Path) -> str:
    import diffusers

    pipeline = getattr(diffusers, PIPELINES[config.model.family])
    pipeline.save_lora_weights(str(out), transformer_lora_layers=state, transformer_lora_adapter_metadata=_metadata(peft_config),
                               weight_name=LORA_FILE)
    return f"diffusers LoRA ({pipeline.__name__}.load_lora_weights / transformer.load_lora_adapter)"


def _diffusers_base(config: Config):
    """The stock diffusers transformer holding the base weights (a diffusers dir, or an apt checkpoint's product)."""
    from apt.models.adapters import adapter_class, load_adapter_state

    cls = adapter_class(config.model.family)
    base = config.lora.base
    if _is_diffusers_dir(base):
        return cls.from_pretrained(base).model
    net = cls.from_config_dir(config.model.path)
    for name in lora.BASE_NAMES:
        try:
            load_adapter_state(net, load_weights(base, name), source=f"{name} in {base}")
            return net.model
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"lora.base {base}: no {' or '.join(n + '.safetensors' for n in lora.BASE_NAMES)} and not a diffusers model directory")


def _diffusers_merged(config: Config, state: dict, peft_config, out: Path) -> str:
    """Merged the stock way: diffusers loads the adapters, fuses them into the weights and drops the adapter layers."""
    model = _diffusers_base(config)
    model.load_lora_adapter(state, prefix=None, adapter_name="apt", metadata=_metadata(peft_config))
    model.fuse_lora(adapter_names=["apt"])
    model.unload_lora()
    model.save_pretrained(str(out))
    return f"diffusers {type(model).__name__} (save_pretrained), LoRA fused"


def _peft_adapters(state: dict, peft_config, out: Path) -> str:
    save_weights(state, out / "adapter_model.safetensors")
    peft_config.save_pretrained(str(out))  # adapter_config.json
    return "peft adapters (adapter_model.safetensors + adapter_config.json)"


def _apt_merged(config: Config, ckpt: Path, name: str, out: Path) -> str:
    """A checkpoint directory with the merged product, read by ``apt sample`` / ``apt.inference.load_generator``."""
    from apt.models import factory
    from apt.text import TextEncoder

    text_dim = TextEncoder.load(config.text.encoder, max_length=config.text.max_length).dim
    net = factory.load_backbone(config, str(ckpt), name, text_dim=text_dim)  # base + adapters, merged
    save_weights(net.state_dict(), out / f"{name}.safetensors")
    save_config(replace(config, lora=LoraConfig()), out / "config.yaml")
    if config.model.source == "python":
        from apt.export_python import export_python

        export_python(out, out, weights=name)  # + model.safetensors, apt_model.json (target, kwargs)
    return "apt checkpoint directory (merged): python -m apt sample DIR"


def _readme(i: dict) -> str:
    pipe_class = PIPELINES.get(i["family"], "Pipeline")
    base = i.get("base_pipeline") or f"<the {i['family']} pipeline directory whose transformer is {i['base']}>"
    call = ", ".join(f"{k}={v!r}" for k, v in (i.get("call") or {"num_inference_steps": 1}).items())
    diffusers_load = {
        False: """pipe.load_lora_weights("<this directory>")          # or pipe.transformer.load_lora_adapter("<this directory>", prefix="transformer")""",
        True: f"""pipe.transformer = diffusers.{i.get('diffusers_class')}.from_pretrained("<this directory>")  # the merged transformer""",
    }[i["merged"]]
    if i["model_source"] == "diffusers":
        load = f"""```python
import diffusers
from diffusers import {pipe_class}

pipe = {pipe_class}.from_pretrained("{base}")
pipe.scheduler = diffusers.{i.get('scheduler', 'FlowMatchEulerDiscreteScheduler')}.from_pretrained("<this directory>", subfolder="scheduler")
{diffusers_load}
out = pipe(prompt="...", {call})
```"""
    elif i["merged"]:  # built-in DiT / in-house: an apt checkpoint directory
        load = "A full model: `python -m apt sample <this directory>`."
    else:
        load = ("`peft` layout: `inject_adapter_in_model(LoraConfig.from_pretrained(DIR), net)`, then "
                "`set_peft_model_state_dict(net, load_file(DIR/adapter_model.safetensors))` on the base network.")
    footer = ("One step from the final timestep (sigma 1 -> 0) with the one-step scheduler written beside the weights, the call's\n"
              "arguments as `python -m apt export` writes them for a full model (`apt_lora.json`: `call`); latent shape\n"
              f"(C, T, H, W) = {tuple(i['latent_shape_CTHW'])}." if i["model_source"] == "diffusers" else
              f"One step per sample, as `python -m apt sample` of the LoRA run; latent shape (C, T, H, W) = {tuple(i['latent_shape_CTHW'])}.")
    return f"""# One-step LoRA generator (apt, {i['stage']} stage){' -- merged' if i['merged'] else ''}

Exported by `apt.export_lora` from `{i['source_checkpoint']}` (the EMA adapters of `{i['weights']}`): {i['format']}.
LoRA rank {i['rank']}, alpha {i['alpha']}, target modules {i['target_modules']}; base weights `{i['base']}`.

{load}

{footer}
"""
