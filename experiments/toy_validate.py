"""Toy metrics of checkpoints on the validation set that training logs (``eval.every_steps``).

    python experiments/toy_validate.py runs/tune/img400/checkpoints/step-000150 runs/demo/distill [--steps 1] [--cfg 1]
    python experiments/toy_validate.py assets/demo_teacher --steps 25 --cfg 2
    python experiments/toy_validate.py runs/demo/apt_video/checkpoints/step-* --split report --num-samples 1000

Samples each checkpoint's product network (EMA) on the validation prompts and noise seeds of
``apt.toy.metrics`` (disjoint from the demo report's set; ``--split report``: the report's prompts
and seeds, ``apt.toy.report.SPLITS``) and prints one JSON line each: the
Fréchet distance to real clips in the toy classifier's feature space and the attribute accuracies.
It scores checkpoints that ran without in-training evaluation (an image stage, a distillation) on the
same scale as the ``val_distance`` of ``eval/history.jsonl`` (docs/log/demo_tuning.md uses both).
"""

from __future__ import annotations

import argparse
import json

from apt.inference import load_generator
from apt.toy.classifier import load_toy_classifier
from apt.toy.metrics import real_stats
from apt.toy.report import SPLITS, add_validation_arguments, split_metrics


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_validation_arguments(ap)
    args = ap.parse_args(argv)
    classifier = load_toy_classifier(args.classifier)
    real = real_stats(classifier, frames=args.frames, n=args.num_samples, seed=SPLITS[args.split][0])
    rows = []
    for ckpt in args.checkpoints:
        m = split_metrics(load_generator(ckpt), classifier, real, split=args.split, n=args.num_samples, steps=args.steps, cfg_scale=args.cfg, frames=args.frames)
        rows.append({"checkpoint": ckpt, "split": args.split, "n": args.num_samples, "steps": args.steps, "cfg": args.cfg, "val_distance": round(float(m["distance"]), 2),
                     "val_attribute_accuracy": float(m["attribute_accuracy"]), "per_attribute": m["per_attribute"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
