"""Toy metrics of checkpoints on the validation set that training logs (``eval.every_steps``).

    python eval/toy_validate.py runs/tune/img400/checkpoints/step-000150 runs/demo/distill [--steps 1] [--cfg 1]
    python eval/toy_validate.py assets/demo_teacher --steps 25 --cfg 2

Samples each checkpoint's product network (EMA) on the validation prompts and noise seeds of
``apt.lit.eval_callback`` (disjoint from the demo report's set) and prints one JSON line each: the
Fréchet distance to real clips in the toy classifier's feature space and the attribute accuracies.
It scores checkpoints that ran without in-training evaluation (an image stage, a distillation) on the
same scale as the ``val_distance`` of ``eval/history.jsonl`` (docs/demo.md uses both).
"""

from __future__ import annotations

import argparse
import json

import torch

from apt.data.toy import eval_prompts
from apt.eval.toy_classifier import load_toy_classifier
from apt.eval.toy_metrics import evaluate_samples, real_stats
from apt.inference import load_generator
from apt.lit.eval_callback import VAL_NOISE_SEED, VAL_PROMPT_SEED


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="checkpoint or run directories")
    ap.add_argument("--steps", type=int, default=1, help="sampling steps (1 = the one-step generator)")
    ap.add_argument("--cfg", type=float, default=1.0, help="CFG scale (the teacher: 2)")
    ap.add_argument("--frames", type=int, default=4, help="frames per sample (the classifier's clips)")
    ap.add_argument("--num-samples", type=int, default=256, help="the training evaluation's default")
    ap.add_argument("--classifier", default="assets/toy_classifier")
    args = ap.parse_args(argv)
    classifier = load_toy_classifier(args.classifier)
    prompts = eval_prompts(args.num_samples, seed=VAL_PROMPT_SEED, frames=args.frames)
    seeds = [VAL_NOISE_SEED + i for i in range(len(prompts))]
    real = real_stats(classifier, frames=args.frames, n=args.num_samples, seed=VAL_PROMPT_SEED)
    rows = []
    for ckpt in args.checkpoints:
        gen = load_generator(ckpt)
        with torch.no_grad():
            x = torch.cat([gen.generate_tensor(prompts[i : i + 256], seeds[i : i + 256], steps=args.steps, cfg_scale=args.cfg, frames=args.frames)
                           for i in range(0, len(prompts), 256)])
        m = evaluate_samples(classifier, x, prompts, real)
        rows.append({"checkpoint": ckpt, "steps": args.steps, "cfg": args.cfg, "val_distance": round(float(m["distance"]), 2),
                     "val_attribute_accuracy": float(m["attribute_accuracy"]), "per_attribute": m["per_attribute"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
