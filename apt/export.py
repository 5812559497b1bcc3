"""Export a trained one-step generator as a diffusers pipeline the stock pipeline class runs with ``prompt=``.

``export_diffusers(checkpoint, out_dir)`` takes an apt checkpoint (or run dir) of a
``model.source: diffusers`` run and loads its product — ``generator_ema`` for an APT run,
``net_ema`` for a distillation run (apt.inference.PRODUCT) — into the wrapped diffusers transformer.
It writes a complete pipeline directory: the base pipeline's components (text encoders, tokenizers,
VAE; hard links where the filesystem allows, else copies), the new ``transformer/``, and a
``scheduler/`` configured so that ``num_inference_steps=1`` is apt's one step (sigma 1 -> 0). Beside
them ``apt_one_step.json`` and ``README.md`` give the exact call: ``prompt=``, one step, the
guidance argument (1.0 = no CFG: it was distilled in; FLUX/HunyuanVideo's ``guidance_scale`` is
their guidance embedding, which apt holds fixed), resolution, frames, ``max_sequence_length``, and
the two-step call where the pipeline's arguments express apt's two-step schedule.

The base pipeline is ``text.encoder`` (a run conditioned as a pipeline encodes prompts; apt.text)
or else the pipeline around ``model.path``. A run conditioned on another text convention (apt's own,
e.g. ``toy-t5``) cannot be reproduced by ``prompt=``: it exports with ``transformer_only=True``.
tests/test_stock_pipeline.py checks, per family, that the stock pipeline's output equals apt's.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from apt.checkpoint import load_weights
from apt.config import Config, config_from_yaml
from apt.flow import timestep_schedule
from apt.inference import PRODUCT, resolve_checkpoint


@dataclass(frozen=True)
class FamilyCall:
    """How one step and two steps of apt are spelled in a family's stock pipeline."""

    scheduler: str
    """The scheduler class the export installs."""
    guidance: str
    """``cfg_off``: ``guidance_scale=1.0`` turns classifier-free guidance off; ``embedding``: ``guidance_scale``
    is the transformer's guidance embedding (the adapter's fixed value)."""
    latents: str
    """apt's latents z (B, C, T, H, W) in the pipeline's ``latents=`` layout (also its ``output_type="latent"`` layout)."""
    two_step: str
    """``default``: ``num_inference_steps=2`` alone; ``sigmas``: plus ``sigmas=[1.0, 0.5]``; ``shift_terminal``: a
    scheduler whose ``shift_terminal`` is apt's middle time; ``""``: not expressible (``two_step_note`` says why)."""
    two_step_note: str = ""


CALLS = {
    "sd3": FamilyCall("FlowMatchEulerDiscreteScheduler", "cfg_off", "z[:, :, 0]", "sigmas"),
    "flux": FamilyCall("FlowMatchEulerDiscreteScheduler", "embedding", "FluxPipeline._pack_latents(z[:, :, 0], B, C, H, W)", "default"),
    "wan": FamilyCall("FlowMatchEulerDiscreteScheduler", "cfg_off", "z", "shift_terminal"),
    "cogvideox": FamilyCall(
        "CogVideoXDDIMScheduler", "cfg_off", "z.permute(0, 2, 1, 3, 4)", "",
        "CogVideoXPipeline steps through integer DDPM timesteps (2 steps: 999 then 499, and it takes no sigmas); "
        "apt's second step is at the fractional timestep of its shifted middle time, so the pipeline cannot express it: "
        "use `python -m apt sample CHECKPOINT --steps 2`."),
    "ltx": FamilyCall("FlowMatchEulerDiscreteScheduler", "cfg_off", "LTXPipeline._pack_latents(z, p, pt)", "default"),
    "hunyuan": FamilyCall("FlowMatchEulerDiscreteScheduler", "embedding", "z", "default"),
}

# Scheduler settings that would change the one-step / two-step sigmas: reset to the plain Euler schedule.
_FLOW_RESET = dict(use_dynamic_shifting=False, shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
                   use_beta_sigmas=False, invert_sigmas=False, stochastic_sampling=False)


def to_pipeline_latents(family: str, z_BCTHW: torch.Tensor, patch: tuple[int, int, int] = (1, 1, 1)) -> torch.Tensor:
    """apt's latents (B, C, T, H, W) in the family pipeline's ``latents=`` layout (``patch``: LTX's (pt, p, p))."""
    if family == "sd3":
        return z_BCTHW[:, :, 0]
    if family == "flux":
        from apt.models.adapters.flux import pack_latents

        return pack_latents(z_BCTHW[:, :, 0])
    if family == "cogvideox":
        return z_BCTHW.permute(0, 2, 1, 3, 4)
    if family == "ltx":
        from apt.models.adapters.ltx import pack_latents

        return pack_latents(z_BCTHW, patch[1], patch[0])
    return z_BCTHW


def from_pipeline_latents(family: str, x, shape_BCTHW: tuple[int, ...], patch: tuple[int, int, int] = (1, 1, 1)) -> torch.Tensor:
    """The inverse of ``to_pipeline_latents`` (for a pipeline's ``output_type="latent"`` result)."""
    _, _, T, H, W = shape_BCTHW
    if family == "sd3":
        return x.unsqueeze(2)
    if family == "flux":
        from apt.models.adapters.flux import unpack_latents

        return unpack_latents(x, H, W).unsqueeze(2)
    if family == "cogvideox":
        return x.permute(0, 2, 1, 3, 4)
    if family == "ltx":
        from apt.models.adapters.ltx import unpack_latents

        pt, p, _ = patch
        return unpack_latents(x, T // pt, H // p, W // p, p, pt)
    return x


def base_pipeline_dir(config: Config) -> Path | None:
    """The pipeline directory the run's teacher came from: text.encoder if it is one, else model.path's parent."""
    from apt.text_pipeline import pipeline_family

    for d in (Path(config.text.encoder), Path(config.model.path).parent):
        if d.is_dir() and (d / "model_index.json").exists() and pipeline_family(d) == config.model.family:
            return d
    return None


def pipeline_call(config: Config, net, codec) -> dict:
    """The keyword arguments of the one-step call (besides ``prompt``), from the run's latent shape."""
    fam = config.model.family
    d = config.data
    call: dict = {"num_inference_steps": 1}
    if CALLS[fam].guidance == "cfg_off":
        call["guidance_scale"] = 1.0
    elif getattr(net.model.config, "guidance_embeds", False):
        call["guidance_scale"] = float(net.guidance_scale)
    call["height"], call["width"] = d.height * codec.spatial_factor, d.width * codec.spatial_factor
    if net.config.video:
        call["num_frames"] = (d.frames - 1) * codec.temporal_stride + 1
    if fam == "ltx":
        call["frame_rate"] = float(net.frame_rate)  # LTXPipeline's RoPE scale uses it (its default is 25)
    call["max_sequence_length"] = config.text.max_length
    return call


def two_step(config: Config) -> tuple[dict, dict] | None:
    """(extra call arguments, scheduler overrides) of apt's two-step schedule in the pipeline, or None."""
    how = CALLS[config.model.family].two_step
    mid = float(timestep_schedule(2, shift=config.flow.sample_shift)[1])
    if how == "default":
        return {"num_inference_steps": 2}, {}
    if how == "sigmas":
        return {"num_inference_steps": 2, "sigmas": [1.0, 0.5]}, {}
    if how == "shift_terminal":
        return {"num_inference_steps": 2}, {"shift_terminal": mid}
    return None


def export_scheduler(config: Config, base: Path | None):
    """The scheduler that makes one pipeline step apt's step from sigma 1 to 0 (and two steps apt's
    two-step schedule where ``two_step`` says so): the base pipeline's settings where they are the same
    scheduler class, with ``shift = flow.sample_shift`` and the plain (non-dynamic) Euler sigmas."""
    import diffusers

    fam = config.model.family
    name = CALLS[fam].scheduler
    klass = getattr(diffusers, name)
    base_config, base_class = {}, None
    sched_file = None if base is None else base / "scheduler" / "scheduler_config.json"
    if sched_file is not None and sched_file.exists():
        raw = json.loads(sched_file.read_text())
        base_config, base_class = {k: v for k, v in raw.items() if not k.startswith("_")}, raw.get("_class_name")
    if fam == "cogvideox":
        from apt.models.adapters.cogvideox import COGVIDEOX_SCHEDULER

        # the adapter's schedule: the base pipeline's own, else CogVideoX-2b's; trailing spacing puts one step at 999
        return klass.from_config({**COGVIDEOX_SCHEDULER, **base_config, "timestep_spacing": "trailing"})
    keep = base_config if base_class == name else {}  # e.g. Wan's UniPC is replaced by a fresh Euler scheduler
    return klass.from_config({**keep, **_FLOW_RESET, "shift": float(config.flow.sample_shift)})


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def export_diffusers(checkpoint: str | Path, out_dir: str | Path, *, weights: str | None = None, transformer_only: bool = False) -> Path:
    """Write the checkpoint's EMA generator as a complete diffusers pipeline (or, with
    ``transformer_only``, the transformer alone) under out_dir; returns out_dir."""
    from apt.codecs import LatentCodec
    from apt.models.adapters import adapter_class, load_adapter_state
    from apt.text import text_convention
    from apt.text_pipeline import convention_id

    ckpt = resolve_checkpoint(checkpoint)
    config = config_from_yaml(ckpt / "config.yaml")
    if config.model.source != "diffusers":
        raise ValueError(f"{ckpt} is a model.source={config.model.source} run; export_diffusers needs a diffusers-source run")
    if config.stage not in ("distill", "apt"):
        raise ValueError(f"{ckpt} is a {config.stage} run; only one-step generators (distill, apt) are exported")
    fam = config.model.family
    base = base_pipeline_dir(config)
    convention = text_convention(config.text.encoder, config.text.max_length)
    if not transformer_only:
        if base is None:
            raise ValueError(f"{ckpt}: no {fam} pipeline directory to build on (neither text.encoder={config.text.encoder!r} nor the parent of "
                             f"model.path={config.model.path} holds a model_index.json); export the transformer alone with transformer_only")
        if convention != convention_id(fam, config.text.max_length):
            raise ValueError(f"{ckpt} was conditioned under the text convention {convention!r}, not as the {fam} pipeline encodes prompts: "
                             f"the stock pipeline's prompt= would not reproduce it; export the transformer alone with transformer_only")
    name = weights or PRODUCT[config.stage]
    net = adapter_class(fam).from_config_dir(config.model.path)
    load_adapter_state(net, load_weights(ckpt, name), source=f"{name} in {ckpt}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "family": fam, "diffusers_class": net.model_class, "pipeline": net.pipeline_class, "source_checkpoint": str(ckpt),
        "weights": name, "stage": config.stage, "apt_time": 1.0,
        "latent_shape_CTHW": [config.data.channels, config.data.frames, config.data.height, config.data.width],
        "base_pipeline": None if base is None else str(base), "base_transformer": config.model.path, "vae": config.model.vae,
        "text_encoder": config.text.encoder, "text_convention": convention,
    }
    if transformer_only:
        net.save_pretrained(out)
        settings["layout"] = "transformer"
        (out / "apt_one_step.json").write_text(json.dumps(settings, indent=2))
        (out / "README.md").write_text(_readme_transformer(settings))
        return out
    # A complete pipeline: the base's components, the new transformer, a one-step scheduler.
    index = json.loads((base / "model_index.json").read_text())
    for key, entry in index.items():
        if key.startswith("_") or key in ("transformer", "scheduler") or not isinstance(entry, list) or entry[0] is None:
            continue
        if (out / key).exists():
            shutil.rmtree(out / key)
        shutil.copytree(base / key, out / key, copy_function=_link_or_copy)
    net.save_pretrained(out / "transformer")
    scheduler = export_scheduler(config, base)
    scheduler.save_pretrained(str(out / "scheduler"))
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    codec = LatentCodec.load(config.model.vae)
    call = pipeline_call(config, net, codec)
    two = two_step(config)
    settings.update({
        "layout": "pipeline", "scheduler": type(scheduler).__name__, "call": call,
        "timestep_at_T": 999.0 if fam == "cogvideox" else 1000.0,
        "latents_layout": CALLS[fam].latents,
        "two_step": None if two is None else {"call": {**call, **two[0]}, "scheduler_overrides": two[1],
                                             "apt_times": [float(t) for t in timestep_schedule(2, shift=config.flow.sample_shift)]},
        "two_step_note": CALLS[fam].two_step_note,
    })
    (out / "apt_one_step.json").write_text(json.dumps(settings, indent=2))
    (out / "README.md").write_text(_readme_pipeline(settings, net))
    return out


def _args(call: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in call.items())


def _readme_pipeline(s: dict, net) -> str:
    fam, pipe, call = s["family"], s["pipeline"], s["call"]
    C, T, H, W = s["latent_shape_CTHW"]
    out_field = "images" if not net.config.video else "frames"
    if CALLS[fam].guidance == "cfg_off":
        guidance = "`guidance_scale=1.0` turns classifier-free guidance off (it was distilled in)"
    elif "guidance_scale" in call:
        guidance = (f"`guidance_scale={call['guidance_scale']:g}` is the transformer's guidance embedding, the value apt held it at in "
                    f"training; {pipe} runs no classifier-free guidance by default (it was distilled in)")
    else:
        guidance = f"this transformer has no guidance embedding, so {pipe} ignores `guidance_scale`; no classifier-free guidance (it was distilled in)"
    pt, p, _ = net.config.patch_size
    latents = CALLS[fam].latents.replace("B, C, H, W", f"1, {C}, {H}, {W}").replace("p, pt", f"{p}, {pt}")
    two = s["two_step"]
    if two is None:
        two_text = f"Two steps: {s['two_step_note']}"
    else:
        setup = ""
        if two["scheduler_overrides"]:
            ov = ", ".join(f"{k}={v!r}" for k, v in two["scheduler_overrides"].items())
            setup = f"pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, {ov})\n"
        two_text = f"""Two steps (apt's schedule: t = {', '.join(f'{t:.6g}' for t in two['apt_times'])}; the generator also works zero-shot at 2):

```python
{setup}out = pipe(prompt="a red fox running through fresh snow", {_args(two['call'])}).{out_field}[0]
```"""
    return f"""# One-step {fam} generator (apt, {s['stage']} stage): a complete {pipe}

Exported by `python -m apt export` from `{s['source_checkpoint']}` (weights `{s['weights']}`):
the base pipeline's components (`{s['base_pipeline']}`), the trained `transformer/`, and a
`{s['scheduler']}` whose single step goes from sigma 1 to 0 (diffusers timestep {s['timestep_at_T']:g}).

```python
import torch
from diffusers import {pipe}{', FlowMatchEulerDiscreteScheduler' if two and two['scheduler_overrides'] else ''}

pipe = {pipe}.from_pretrained("<this directory>")  # on a GPU: torch_dtype=torch.bfloat16, then pipe.to("cuda")
out = pipe(prompt="a red fox running through fresh snow", {_args(call)}).{out_field}[0]
```

- {guidance}.
- `max_sequence_length={call['max_sequence_length']}` is the text length apt conditioned on
  (`text.max_length`; convention `{s['text_convention']}`: prompts encoded exactly as {pipe} encodes them).
- Resolution and frames give the latent shape (C, T, H, W) = ({C}, {T}, {H}, {W}) apt trained at.

apt's own sample for a seed (`python -m apt sample --seed SEED` draws prompt i's noise with seed
SEED + i) is the same call with that noise as `latents=`, in the pipeline's layout, and
`output_type="latent"` (the latents before the VAE, in the same layout):

```python
seed = 0
z = torch.randn({C}, {T}, {H}, {W}, generator=torch.Generator().manual_seed(seed))[None]  # apt's (B, C, T, H, W)
latents = {latents}
x0 = pipe(prompt="...", latents=latents, output_type="latent", {_args(call)}).{out_field}
```

{two_text}
"""


def _readme_transformer(s: dict) -> str:
    return f"""# One-step {s['family']} transformer (apt, {s['stage']} stage)

Exported by `python -m apt export --transformer-only` from `{s['source_checkpoint']}` (weights
`{s['weights']}`). The run conditioned its text under the convention `{s['text_convention']}`,
which is not how `{s['pipeline']}` encodes prompts, so a stock pipeline with `prompt=` would not
reproduce it; the transformer loads with its stock class:

```python
from diffusers import {s['diffusers_class']}
transformer = {s['diffusers_class']}.from_pretrained("<this directory>")
```

The sample is `z - v(z, T)` (apt time 1, sigma 1 -> 0) for noise z of latent shape
(C, T, H, W) = {tuple(s['latent_shape_CTHW'])}, with the text embeddings of that convention.
"""
