"""Where a checkpoint's toy distance comes from: the floor, the mean and covariance terms, and text alignment.

    python experiments/toy_gap.py runs/tune5/v1500_mm/checkpoints/step-000175 [--steps 1] [--cfg 1]
    python experiments/toy_gap.py assets/demo_teacher --steps 25 --cfg 3
    python experiments/toy_gap.py runs/demo/apt_video/checkpoints/step-000175 --noise-scale 0.7

On the validation split of ``apt.toy.metrics`` (the set ``experiments/toy_validate.py`` and training's
``eval.every_steps`` score), or with ``--split report`` on the demo report's prompts and noise seeds
(``apt.toy.report``; pass ``--num-samples 1000`` for the report's N), prints one JSON line per
checkpoint with
    floor                the real-vs-real distance at the same n (two disjoint real sets): what a perfect
                         generator can expect, so ``distance - floor`` is the part a model can still remove;
    distance             the split's distance, split into mean_term ||mu_g - mu_r||^2 and the rest;
    feature_trace        Tr(Sigma) of the samples' features next to the real set's (lower: less diverse);
    aligned_distance     the distance after every sample whose classified shape/colour/direction/background
                         does not match its prompt is re-drawn from other noise seeds (up to --redraws times)
                         until it does: ``distance - aligned_distance`` is what text misalignment costs, the
                         rest is fidelity and diversity;
    ambiguous_shape      the share of samples whose shape the classifier calls with top probability below
                         ``apt.toy.metrics.AMBIGUOUS_SHAPE`` (a blob between two shapes), next to the real set's;
    confident_distance   the distance after every misaligned or ambiguous-shape sample is re-drawn likewise;
    high_frequency_share sharpness (``apt.toy.content``), next to the real set's;
    distractor_visible   the share of samples showing the uncaptioned distractor, next to the real set's.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from apt.eval.frechet import stats_distance
from apt.inference import load_generator
from apt.toy.classifier import load_toy_classifier
from apt.toy.content import distractor_visible, high_frequency_share
from apt.toy.metrics import features_and_predictions, judge, real_batches, real_stats, real_vs_real_floor
from apt.toy.report import SPLITS, add_validation_arguments, generate_seeded, noise_scaled
from apt.toy.world import eval_prompts

REDRAW_SEED_STRIDE = 100_003
"""Re-draw k of sample i uses noise seed NOISE_SEED + k * REDRAW_SEED_STRIDE + i (disjoint from the split's seeds)."""


def real_summary(classifier, real, real_clips) -> dict:
    """The real set's side of every row (computed once): feature spread, ambiguous shapes, sharpness, distractor."""
    x_real, captions_real = real_clips
    _, _, ambiguous_real = judge(classifier, x_real, captions_real)
    return {"real_feature_trace": round(float(np.trace(real.sigma)), 1), "real_ambiguous_shape": float(ambiguous_real.mean()),
            "real_high_frequency_share": round(high_frequency_share(x_real), 4),
            "real_distractor_visible": distractor_visible(x_real, captions_real)}


def redrawn(gen, classifier, x, prompts, good_N, *, noise_seed: int, steps: int, cfg: float, frames: int, redraws: int,
            confident: bool) -> tuple[torch.Tensor, float]:
    """x with every sample not ``good_N`` re-drawn from other seeds until it is (aligned, and also
    unambiguous if ``confident``), at most ``redraws`` times; and the share still not good."""
    x, good_N = x.clone(), good_N.copy()
    for k in range(1, redraws + 1):
        bad = np.flatnonzero(~good_N).tolist()
        if not bad:
            break
        x_bad = generate_seeded(gen, [prompts[i] for i in bad], [noise_seed + k * REDRAW_SEED_STRIDE + i for i in bad],
                                steps=steps, cfg_scale=cfg, frames=frames)
        _, ok, ambiguous = judge(classifier, x_bad, [prompts[i] for i in bad])
        for j in np.flatnonzero(ok & ~ambiguous if confident else ok):
            x[bad[j]], good_N[bad[j]] = x_bad[j], True
    return x, float(1 - good_N.mean())


def gap(gen, classifier, real, *, split: str, n: int, steps: int, cfg: float, frames: int, redraws: int) -> dict:
    """The split of one generator's distance on ``split`` against ``real`` (its real set's feature statistics)."""
    prompt_seed, noise_seed = SPLITS[split]
    prompts = eval_prompts(n, seed=prompt_seed, frames=frames)
    x = generate_seeded(gen, prompts, [noise_seed + i for i in range(n)], steps=steps, cfg_scale=cfg, frames=frames)
    stats, ok_N, ambiguous_N = judge(classifier, x, prompts)
    distance, mean_term = stats_distance(stats, real), float(((stats.mu - real.mu) ** 2).sum())
    kw = dict(noise_seed=noise_seed, steps=steps, cfg=cfg, frames=frames, redraws=redraws)
    x_aligned, still_misaligned = redrawn(gen, classifier, x, prompts, ok_N, confident=False, **kw)
    x_confident, still_unconfident = redrawn(gen, classifier, x, prompts, ok_N & ~ambiguous_N, confident=True, **kw)

    def distance_of(y):
        return round(stats_distance(features_and_predictions(classifier, [y], n)[0], real), 2)

    return {"distance": round(distance, 2), "mean_term": round(mean_term, 2), "cov_term": round(distance - mean_term, 2),
            "feature_trace": round(float(np.trace(stats.sigma)), 1), "attribute_accuracy": float(ok_N.mean()),
            "aligned_distance": distance_of(x_aligned), "still_misaligned": still_misaligned,
            "ambiguous_shape": float(ambiguous_N.mean()), "confident_distance": distance_of(x_confident),
            "still_unconfident": still_unconfident, "high_frequency_share": round(high_frequency_share(x), 4),
            "distractor_visible": distractor_visible(x, prompts)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_validation_arguments(ap)
    ap.add_argument("--redraws", type=int, default=20, help="most re-draws of a misaligned or ambiguous-shape sample")
    ap.add_argument("--noise-scale", type=float, default=1.0, help="one step from scaled noise s z (experiments/toy_noise_scale.py)")
    args = ap.parse_args(argv)
    if args.noise_scale != 1.0 and args.steps != 1:
        ap.error(f"--noise-scale {args.noise_scale} needs --steps 1 (it scales the one-step generator's noise), got --steps {args.steps}")
    classifier = load_toy_classifier(args.classifier)
    prompt_seed, _ = SPLITS[args.split]
    real = real_stats(classifier, frames=args.frames, n=args.num_samples, seed=prompt_seed)
    floor = round(real_vs_real_floor(classifier, frames=args.frames, n=args.num_samples, seed=prompt_seed, first=real), 2)
    real_side = real_summary(classifier, real, next(real_batches(args.frames, args.num_samples, prompt_seed, batch_size=args.num_samples)))
    rows = []
    for ckpt in args.checkpoints:
        with noise_scaled(load_generator(ckpt), args.noise_scale) as gen:
            parts = gap(gen, classifier, real, split=args.split, n=args.num_samples, steps=args.steps, cfg=args.cfg,
                        frames=args.frames, redraws=args.redraws)
        row = {"checkpoint": ckpt, "split": args.split, "steps": args.steps, "cfg": args.cfg, "noise_scale": args.noise_scale, "n": args.num_samples,
               "floor": floor, **parts, **real_side}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
