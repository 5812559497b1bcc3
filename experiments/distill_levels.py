"""Where a consistency-distilled student's one-step error lives: k teacher steps first, then the student.

    python experiments/distill_levels.py assets/demo_teacher runs/demo/distill [--cfg 4] [--steps 8] [--split report]

For k = 0 .. steps - 1 the sampler takes k Euler steps of the teacher with CFG on the stage-1 grid
(``apt.flow.timestep_schedule(steps)``, the discrete timesteps ``distill.num_steps`` distils over) and
then the student's clean-sample estimate from there, x_hat = x_k - t_k v_student(x_k, t_k). Row k = 0 is
the one-step generator G(z, c) = z - G^(z, c, T); row k is the student's estimate from level t_k of the
teacher's own trajectory, i.e. the target the student regresses onto one level up. A row far better
than the one above it says the student does not fit that level's map (docs/log/demo_tuning.md, fourteenth
round: the demo's student scores 13.7 from pure noise and 8.6 after one teacher step). Prints one JSON
line per k: the split's Fréchet distance in the toy classifier's feature space, the attribute accuracy
and the share of samples with an ambiguous shape (``apt.toy.metrics.judge``).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from apt.eval.frechet import stats_distance
from apt.flow import guided_velocity, timestep_schedule
from apt.inference import Generator, load_generator, seeded_noise
from apt.toy.classifier import load_toy_classifier
from apt.toy.metrics import judge, real_stats
from apt.toy.report import BATCH, SPLITS
from apt.toy.world import eval_prompts


@torch.inference_mode()
def handoff_samples(teacher: Generator, student: Generator, prompts: list[str], seeds: list[int], *, k: int, steps: int, cfg_scale: float) -> torch.Tensor:
    """k teacher Euler steps with CFG from t = 1 on a ``steps``-step grid, then the student's x_hat at t_k."""
    if not 0 <= k < steps:
        raise ValueError(f"k must be in [0, {steps}), got {k}")
    c = student.config
    ts = timestep_schedule(steps)
    out = []
    for i in range(0, len(prompts), BATCH):
        batch = prompts[i : i + BATCH]
        x = seeded_noise((c.data.channels, student.num_frames, c.data.height, c.data.width), seeds[i : i + BATCH])
        text, negative = teacher.text_encoder.encode(batch), teacher.text_encoder.encode([teacher.config.flow.negative_prompt] * len(batch), allow_empty=True)
        for j in range(k):
            x = x + (ts[j + 1] - ts[j]) * guided_velocity(teacher.net, x, ts[j].expand(len(batch)), text, negative, cfg_scale)
        out.append(x - ts[k] * student.net(x, ts[k].expand(len(batch)), student.text_encoder.encode(batch)))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("teacher")
    ap.add_argument("student", help="a stage-1 (distilled) or APT checkpoint or run directory")
    ap.add_argument("--cfg", type=float, default=4.0, help="the teacher's guidance (the demo distils at 4)")
    ap.add_argument("--steps", type=int, default=8, help="the stage-1 grid (distill.num_steps)")
    ap.add_argument("--split", choices=sorted(SPLITS), default="report")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--classifier", default="assets/toy_classifier")
    args = ap.parse_args(argv)
    classifier = load_toy_classifier(args.classifier)
    teacher, student = load_generator(args.teacher), load_generator(args.student)
    prompt_seed, noise_seed = SPLITS[args.split]
    prompts = eval_prompts(args.num_samples, seed=prompt_seed, frames=student.num_frames)
    seeds = [noise_seed + i for i in range(args.num_samples)]
    real = real_stats(classifier, frames=student.num_frames, n=args.num_samples, seed=prompt_seed)
    ts = timestep_schedule(args.steps)
    rows = []
    for k in range(args.steps):
        x = handoff_samples(teacher, student, prompts, seeds, k=k, steps=args.steps, cfg_scale=args.cfg)
        stats, ok_N, ambiguous_N = judge(classifier, x, prompts)
        rows.append({"teacher_steps": k, "t": round(float(ts[k]), 4), "distance": round(stats_distance(stats, real), 2),
                     "attribute_accuracy": float(np.mean(ok_N)), "ambiguous_shape": float(np.mean(ambiguous_N)), "split": args.split, "n": args.num_samples})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
