"""Teacher ODE pairs (z, c) -> x: the guided teacher's sample from a known noise, for a regression anchor.

Not in APT. DMD (arXiv 2311.18828 §3.3) pairs its distribution-matching loss with a regression onto
a fixed set of the teacher's ODE solutions; ``apt.regression_weight`` adds that term to the APT
G step, so the one-step sample of a pair's noise stays near the guided teacher's sample of it.

A pairs file is safetensors: ``z`` and ``x`` (N, C, T, H, W) in the model's (latent) space, and in
its metadata the prompts and how the samples were made.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from apt.data.toy import eval_prompts
from apt.inference import Generator, load_generator, sample, seeded_noise


def write_pairs(teacher: str, out: str | Path, *, prompts: str, num: int = 2048, frames: int | None = None,
                steps: int = 25, cfg_scale: float | None = None, seed: int = 0) -> Path:
    """``python -m apt pairs``: ``num`` pairs of the teacher; ``prompts`` a text file (one per line, cycled) or 'toy'
    (the toy world's captions, balanced over its attribute combinations)."""
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    gen = load_generator(teacher)
    config = gen.config
    frames = frames or config.data.frames
    cfg_scale = config.flow.cfg_scale if cfg_scale is None else cfg_scale
    if prompts == "toy":
        texts = eval_prompts(num, seed=seed, frames=frames)
    else:
        if not Path(prompts).is_file():
            raise FileNotFoundError(f"--prompts: no file {prompts} (a text file with one prompt per line, or 'toy')")
        lines = [line.strip() for line in Path(prompts).read_text().splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"--prompts: {prompts} has no prompts")
        texts = [lines[i % len(lines)] for i in range(num)]
    z, x = make_pairs(gen, texts, [seed + i for i in range(num)], steps=steps, cfg_scale=cfg_scale, frames=frames)
    save_pairs(out, z, x, texts, {"teacher": str(teacher), "steps": steps, "cfg_scale": cfg_scale, "seed": seed})
    return Path(out)


def make_pairs(gen: Generator, prompts: list[str], seeds: list[int], *, steps: int, cfg_scale: float, frames: int, batch_size: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, x): seeded noise and the teacher's ``steps``-step Euler sample from it at CFG ``cfg_scale``, in its (latent) space."""
    c = gen.config
    z = seeded_noise((c.data.channels, frames, c.data.height, c.data.width), seeds)
    xs = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="teacher ODE pairs", unit="batch"):
        xs.append(sample(gen.net, gen.text_encoder, c, prompts[i : i + batch_size], seeds[i : i + batch_size], steps=steps, cfg_scale=cfg_scale, frames=frames))
    return z, torch.cat(xs)


def save_pairs(path: str | Path, z: torch.Tensor, x: torch.Tensor, prompts: list[str], info: dict) -> None:
    if z.shape != x.shape or len(prompts) != z.shape[0]:
        raise ValueError(f"pairs: z {tuple(z.shape)}, x {tuple(x.shape)} and {len(prompts)} prompts do not match")
    metadata = {"prompts": json.dumps(prompts), "info": json.dumps(info)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"z": z.contiguous(), "x": x.contiguous()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # never a half-written file under the final name


def load_pairs(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(z, x, prompts) of a pairs file; a clear error when it is missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"apt.regression_pairs: no pairs file at {p} (write one with `python -m apt pairs TEACHER --out {p}`)")
    with safe_open(str(p), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata() or {}
        if keys != {"z", "x"} or "prompts" not in metadata:
            raise ValueError(f"apt.regression_pairs: {p} is not a pairs file (tensors {sorted(keys)}, metadata {sorted(metadata)}; expected z, x and prompts)")
        z, x = f.get_tensor("z"), f.get_tensor("x")
    prompts = json.loads(metadata["prompts"])
    if z.shape != x.shape or len(prompts) != z.shape[0]:
        raise ValueError(f"apt.regression_pairs: {p} holds z {tuple(z.shape)}, x {tuple(x.shape)} and {len(prompts)} prompts")
    return z, x, prompts
