"""A one-step checkpoint sampled from scaled noise: the truncation trick of GANs (not in the APT paper).

    python experiments/toy_noise_scale.py runs/demo/apt_video/checkpoints/step-000175 --scales 1.0 0.9 0.8 0.7

For noise scale s the sample of noise z is the one-step sample of s z: G(s z, c) = s z - G^(s z, c, T).
Prints one JSON line per scale with the toy metrics on the validation set (the set of
``experiments/toy_validate.py``) and on the demo report's set (its prompts and noise seeds), so that a scale
picked on validation can be checked on the report's samples. Scale 1 is the plain one-step generator.
docs/log/demo_tuning.md (tenth round) has what it measured.
"""

from __future__ import annotations

import argparse
import json

from apt.inference import load_generator
from apt.toy.classifier import load_toy_classifier
from apt.toy.metrics import VAL_PROMPT_SEED, real_stats
from apt.toy.report import EVAL_SEED, noise_scaled, report_set_metrics, validation_metrics


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a one-step generator: checkpoint or run directory")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7])
    ap.add_argument("--val-samples", type=int, default=256, help="validation set size (training's eval default)")
    ap.add_argument("--report-samples", type=int, default=1000, help="the demo report's set size")
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--classifier", default="assets/toy_classifier")
    args = ap.parse_args(argv)
    classifier = load_toy_classifier(args.classifier)
    val_real = real_stats(classifier, frames=args.frames, n=args.val_samples, seed=VAL_PROMPT_SEED)
    report_real = real_stats(classifier, frames=args.frames, n=args.report_samples, seed=EVAL_SEED)
    gen = load_generator(args.checkpoint)
    rows = []
    for scale in args.scales:
        with noise_scaled(gen, scale):
            val = validation_metrics(gen, classifier, val_real, n=args.val_samples, steps=1, cfg_scale=1.0, frames=args.frames)
            report = report_set_metrics(gen, classifier, report_real, n=args.report_samples, steps=1, cfg_scale=1.0, frames=args.frames)
        rows.append({"checkpoint": args.checkpoint, "noise_scale": scale,
                     "val_distance": round(float(val["distance"]), 2), "val_attribute_accuracy": float(val["attribute_accuracy"]),
                     "report_distance": round(float(report["distance"]), 2), "report_attribute_accuracy": float(report["attribute_accuracy"])})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
