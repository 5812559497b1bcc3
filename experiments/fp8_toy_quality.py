"""Effect of FP8 matmuls (``perf.fp8``) on the toy benchmark's quality.

    python experiments/fp8_toy_quality.py [--demo runs/demo] [--num-samples 1000]

Evaluates the demo's teacher (25 steps, CFG 2) and APT one-step generator (the checkpoint the demo
report chose) with and without FP8, on the demo report's prompts, seeds and real statistics. On CPU
the FP8 path is emulated (weights and activations rounded to float8_e4m3fn with per-tensor scales,
``apt.perf.fp8``), so this measures the numerical effect, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from apt.config import PerfConfig
from apt.inference import load_generator
from apt.toy.classifier import load_toy_classifier
from apt.toy.metrics import evaluate_samples, real_stats
from apt.toy.report import EVAL_SEED, generate_all
from apt.toy.world import eval_prompts


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="runs/demo")
    ap.add_argument("--teacher", default="assets/demo_teacher")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--rows", default="teacher,apt", help="which rows: teacher, apt (emulated FP8 is slow for the 50-NFE teacher on CPU)")
    args = ap.parse_args(argv)
    report = json.loads((Path(args.demo) / "report.json").read_text())
    classifier = load_toy_classifier()
    rows = []
    wanted = set(args.rows.split(","))
    specs = [("teacher", "teacher-25step-cfg", args.teacher, 25, 2.0), ("apt", "apt-1step", report["apt_checkpoint"], 1, 1.0)]
    for name, ckpt, steps, cfg in [s[1:] for s in specs if s[0] in wanted]:
        for fp8 in (False, True):
            gen = load_generator(ckpt, perf=PerfConfig(fp8=fp8))
            prompts = eval_prompts(args.num_samples, seed=EVAL_SEED, frames=gen.num_frames)
            real = real_stats(classifier, frames=gen.num_frames, n=args.num_samples, seed=EVAL_SEED)
            x, _ = generate_all(gen, prompts, 10_000, steps=steps, cfg_scale=cfg)
            m = evaluate_samples(classifier, x, prompts, real)
            rows.append({"row": name, "fp8": fp8, "distance": round(m["distance"], 2), "attribute_accuracy": m["attribute_accuracy"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
