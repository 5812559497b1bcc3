"""Where a checkpoint's toy distance comes from: the floor, the mean and covariance terms, and text alignment.

    python eval/toy_gap.py runs/tune5/v1500_mm/checkpoints/step-000175 [--steps 1] [--cfg 1]
    python eval/toy_gap.py assets/demo_teacher --steps 25 --cfg 3
    python eval/toy_gap.py runs/demo/apt_video/checkpoints/step-000175 --noise-scale 0.7

On the validation split of ``apt.eval.toy_metrics`` (the set ``eval/toy_validate.py`` and training's
``eval.every_steps`` score), prints one JSON line per checkpoint with
    floor                the real-vs-real distance at the same n (two disjoint real sets): what a perfect
                         generator can expect, so ``distance - floor`` is the part a model can still remove;
    distance             the validation distance, split into mean_term ||mu_g - mu_r||^2 and the rest;
    feature_trace        Tr(Sigma) of the samples' features next to the real set's (lower: less diverse);
    aligned_distance     the distance after every sample whose classified shape/colour/direction/background
                         does not match its prompt is re-drawn from other noise seeds (up to --redraws times)
                         until it does: ``distance - aligned_distance`` is what text misalignment costs, the
                         rest is fidelity and diversity.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from apt.data.toy import eval_prompts
from apt.eval.frechet import stats_distance
from apt.eval.toy_classifier import load_toy_classifier
from apt.eval.toy_metrics import (VAL_NOISE_SEED, VAL_PROMPT_SEED, correct_mask, features_and_predictions, real_stats,
                                  real_vs_real_floor)
from apt.eval.toy_report import add_validation_arguments, generate_seeded, noise_scaled
from apt.inference import load_generator

REDRAW_SEED_STRIDE = 100_003
"""Re-draw k of sample i uses noise seed VAL_NOISE_SEED + k * REDRAW_SEED_STRIDE + i (disjoint from the split's seeds)."""


def gap(gen, classifier, real, *, n: int, steps: int, cfg: float, frames: int, redraws: int) -> dict:
    prompts = eval_prompts(n, seed=VAL_PROMPT_SEED, frames=frames)
    x = generate_seeded(gen, prompts, [VAL_NOISE_SEED + i for i in range(n)], steps=steps, cfg_scale=cfg, frames=frames)
    stats, preds = features_and_predictions(classifier, [x], n)
    ok_N, _ = correct_mask(preds, prompts)
    distance, mean_term = stats_distance(stats, real), float(((stats.mu - real.mu) ** 2).sum())
    accuracy = float(ok_N.mean())
    for k in range(1, redraws + 1):
        bad = np.flatnonzero(~ok_N).tolist()
        if not bad:
            break
        x_bad = generate_seeded(gen, [prompts[i] for i in bad], [VAL_NOISE_SEED + k * REDRAW_SEED_STRIDE + i for i in bad],
                                steps=steps, cfg_scale=cfg, frames=frames)
        _, preds_bad = features_and_predictions(classifier, [x_bad], n)
        hit, _ = correct_mask(preds_bad, [prompts[i] for i in bad])
        for j in np.flatnonzero(hit):
            x[bad[j]], ok_N[bad[j]] = x_bad[j], True
    aligned, _ = features_and_predictions(classifier, [x], n)
    return {"distance": round(distance, 2), "mean_term": round(mean_term, 2), "cov_term": round(distance - mean_term, 2),
            "feature_trace": round(float(np.trace(stats.sigma)), 1), "real_feature_trace": round(float(np.trace(real.sigma)), 1),
            "attribute_accuracy": accuracy, "aligned_distance": round(stats_distance(aligned, real), 2),
            "still_misaligned": float(1 - ok_N.mean())}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_validation_arguments(ap)
    ap.add_argument("--redraws", type=int, default=20, help="most re-draws of a misaligned sample")
    ap.add_argument("--noise-scale", type=float, default=1.0, help="one step from scaled noise s z (eval/toy_noise_scale.py)")
    args = ap.parse_args(argv)
    if args.noise_scale != 1.0 and args.steps != 1:
        ap.error(f"--noise-scale {args.noise_scale} needs --steps 1 (it scales the one-step generator's noise), got --steps {args.steps}")
    classifier = load_toy_classifier(args.classifier)
    real = real_stats(classifier, frames=args.frames, n=args.num_samples, seed=VAL_PROMPT_SEED)
    floor = round(real_vs_real_floor(classifier, frames=args.frames, n=args.num_samples, seed=VAL_PROMPT_SEED, first=real), 2)
    rows = []
    for ckpt in args.checkpoints:
        with noise_scaled(load_generator(ckpt), args.noise_scale) as gen:
            split = gap(gen, classifier, real, n=args.num_samples, steps=args.steps, cfg=args.cfg, frames=args.frames, redraws=args.redraws)
        row = {"checkpoint": ckpt, "steps": args.steps, "cfg": args.cfg, "noise_scale": args.noise_scale, "n": args.num_samples,
               "floor": floor, **split}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
