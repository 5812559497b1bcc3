"""Effect of the quantised speed switches (FP8 linears, quantised attention kernels) on the toy benchmark's quality.

    python experiments/fp8_toy_quality.py [--demo runs/demo] [--num-samples 1000] [--rows teacher,apt] [--variants plain,fp8]
    python experiments/fp8_toy_quality.py --rows apt --variants plain,fp8,fa3_fp8,sage,fa3,fa3_fp8+fp8

Evaluates the demo's teacher (25 steps, CFG 2) and APT one-step generator (the checkpoint the demo
report chose) under each variant, on the demo report's prompts, seeds and real statistics. On CPU
every quantised path is emulated (``apt.perf.fp8``: weights and activations rounded to
float8_e4m3fn; ``apt.models.attention_kernels``: the kernels' q/k/v/P quantisation), so this
measures the numerical effect, not a speed-up. The attention kernels take no dense mask, so their
variants run with ``perf.text_padding=varlen`` (prompts of different lengths grouped; exact).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from apt.config import PerfConfig
from apt.inference import load_generator
from apt.toy.classifier import load_toy_classifier
from apt.toy.metrics import evaluate_samples, real_stats
from apt.toy.report import EVAL_SEED, generate_all
from apt.toy.world import eval_prompts

VARIANTS = {
    "plain": {},
    "fp8": dict(fp8=True),
    "fp8_row": dict(fp8=True, fp8_scaling="row"),
    "fp8_fast": dict(fp8=True, fp8_fast_accum=True),
    "fa3": dict(attention_backend="fa3", text_padding="varlen"),
    "fa3_fp8": dict(attention_backend="fa3_fp8", text_padding="varlen"),
    "sage": dict(attention_backend="sage", text_padding="varlen"),
    "fa3_fp8+fp8": dict(attention_backend="fa3_fp8", text_padding="varlen", fp8=True),
}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", default="runs/demo")
    ap.add_argument("--teacher", default="assets/demo_teacher")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--rows", default="teacher,apt", help="which rows: teacher, apt (emulated FP8 is slow for the 50-NFE teacher on CPU)")
    ap.add_argument("--variants", default="plain,fp8", help=f"comma list of {', '.join(VARIANTS)}")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    classifier = load_toy_classifier()
    rows = []
    wanted = set(args.rows.split(","))
    specs = [("teacher", "teacher-25step-cfg", args.teacher, 25, 2.0)]
    if "apt" in wanted:
        specs.append(("apt", "apt-1step", json.loads((Path(args.demo) / "report.json").read_text())["apt_checkpoint"], 1, 1.0))
    for name, ckpt, steps, cfg in [s[1:] for s in specs if s[0] in wanted]:
        for variant in variants:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the CPU emulation notices
                gen = load_generator(ckpt, perf=PerfConfig(**VARIANTS[variant]))
            prompts = eval_prompts(args.num_samples, seed=EVAL_SEED, frames=gen.num_frames)
            real = real_stats(classifier, frames=gen.num_frames, n=args.num_samples, seed=EVAL_SEED)
            x, _ = generate_all(gen, prompts, 10_000, steps=steps, cfg_scale=cfg)
            m = evaluate_samples(classifier, x, prompts, real)
            rows.append({"row": name, "variant": variant, "fp8": bool(VARIANTS[variant].get("fp8")),
                         "distance": round(m["distance"], 2), "attribute_accuracy": m["attribute_accuracy"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
