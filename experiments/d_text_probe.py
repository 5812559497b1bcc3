"""Does an APT discriminator judge text alignment? A probe on the toy world.

    python experiments/d_text_probe.py runs/demo/apt_video/checkpoints/step-000200 [--attribute shape] [--num-samples 256]

Scores real validation clips (the prompts of ``apt.toy.metrics``' validation split) under their
true caption and under the same caption with one attribute swapped (shape by default: "a red circle ..."
-> "a red square ..."), at several timesteps of D's ensemble, and prints one JSON line per timestep:
the mean logits and the share of clips whose true caption scores higher. 0.5 means D ignores that
attribute of the text; docs/log/demo_tuning.md (third round) uses it to show why the toy's one-step shapes stay wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from apt.inference import load_discriminator
from apt.toy.metrics import VAL_PROMPT_SEED
from apt.toy.world import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    caption,
    eval_prompts,
    parse_caption,
    render_batch,
)

CHOICES = {"shape": tuple(SHAPES), "colour": tuple(COLOURS), "direction": tuple(DIRECTIONS), "background": tuple(BACKGROUNDS)}


def swapped_captions(prompts: list[str], attribute: str) -> list[str]:
    """Each prompt with ``attribute`` replaced by another value (alternating between the others)."""
    out = []
    for i, p in enumerate(prompts):
        a = parse_caption(p)
        others = [v for v in CHOICES[attribute] if v != getattr(a, attribute)]
        out.append(caption(dataclasses.replace(a, **{attribute: others[i % len(others)]})))
    return out


def probe(checkpoint: str, *, attribute: str = "shape", num_samples: int = 256, timesteps=(0.05, 0.2, 0.4, 0.6, 0.8), frames: int = 4) -> list[dict]:
    D, text_encoder = load_discriminator(checkpoint)
    prompts = eval_prompts(num_samples, seed=VAL_PROMPT_SEED, frames=frames)
    x = torch.from_numpy(render_batch([parse_caption(p) for p in prompts], seed=VAL_PROMPT_SEED, frames=frames))
    x = x.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    true_text, wrong_text = text_encoder.encode(prompts), text_encoder.encode(swapped_captions(prompts, attribute))
    rows = []
    with torch.no_grad():
        for t in timesteps:
            t_B = torch.full((num_samples,), float(t))
            right, wrong = D(x, t_B, true_text), D(x, t_B, wrong_text)
            rows.append({"checkpoint": str(checkpoint), "attribute": attribute, "t": t, "d_true_caption": round(right.mean().item(), 3),
                         "d_swapped_caption": round(wrong.mean().item(), 3), "share_true_higher": round((right > wrong).float().mean().item(), 3)})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="an APT checkpoint (or run) directory with discriminator.safetensors")
    ap.add_argument("--attribute", choices=sorted(CHOICES), default="shape")
    ap.add_argument("--num-samples", type=int, default=256)
    args = ap.parse_args(argv)
    rows = probe(args.checkpoint, attribute=args.attribute, num_samples=args.num_samples)
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
