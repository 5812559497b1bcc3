"""APT ablations on the toy world (APT paper §4.4): aR1 off, readout heads at the last layer only,
frozen discriminator backbone — each against the full method, from the same distilled generator.

    python experiments/ablations.py --distilled runs/demo/distill --teacher assets/demo_teacher \
        --out runs/ablations [--steps 150] [--num-samples N]

Each variant trains the video APT stage (recipes/demo/apt_video.yaml) with one change, then the
EMA generator of its last checkpoint is evaluated on the demo report's prompts and seeds (its N by
default, ``apt.toy.report.REPORT_SAMPLES``). Every iteration is
logged. Prints a markdown table (final D loss, mean D(real) - D(fake) over the last 20 iterations,
distance, attribute accuracy) and writes it to OUT/ablations.md and OUT/ablations.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

VARIANTS = {
    "full (aR1, heads at 16/26/36 of 36, D trained)": [],
    "aR1 off": ["apt.use_r1=false"],
    "heads at last layer only": ["apt.readout_fractions=[1.0]"],
    "D backbone frozen": ["apt.train_d_backbone=false"],
}


def last_rows(run_dir: Path, n: int = 20) -> list[dict]:
    rows = []
    for f in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        rows += [r for r in csv.DictReader(open(f)) if r.get("loss_d")]
    return rows[-n:]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--distilled", default="runs/demo/distill")
    ap.add_argument("--teacher", default="assets/demo_teacher")
    ap.add_argument("--shards", default="runs/data/toy-video")
    ap.add_argument("--out", default="runs/ablations")
    ap.add_argument("--steps", type=int, default=150, help="generator updates per variant")
    ap.add_argument("--num-samples", type=int, default=None, help="default: the demo report's N (apt.toy.report.REPORT_SAMPLES)")
    ap.add_argument("--overlay", action="append", default=[], help="e.g. tiny (smoke test)")
    args = ap.parse_args(argv)

    from apt.checkpoint import latest_checkpoint
    from apt.config import load_config
    from apt.inference import load_generator
    from apt.toy.classifier import load_toy_classifier
    from apt.toy.metrics import real_stats
    from apt.toy.report import EVAL_SEED, REPORT_SAMPLES, report_set_metrics
    from apt.train import fit

    n = args.num_samples or REPORT_SAMPLES
    out = Path(args.out)
    classifier = load_toy_classifier()
    results = []
    for name, overrides in VARIANTS.items():
        run = out / name.split(" (")[0].replace(" ", "_")
        c = load_config("recipes/demo/apt_video.yaml", args.overlay, [
            f"run_dir={run}", "resume=auto", f"apt.generator={args.distilled}", f"apt.teacher={args.teacher}",
            f"data.shards={args.shards}", f"train.max_steps={args.steps}", "train.sample_every_steps=0", "train.log_every_steps=1", *overrides])
        t0 = time.perf_counter()
        if latest_checkpoint(run) is None or int(latest_checkpoint(run).name.split("-")[1]) < args.steps:
            fit(c)
        gen = load_generator(run)
        real = real_stats(classifier, frames=gen.num_frames, n=n, seed=EVAL_SEED, cache_path=str(out / f"real_{n}.npz"))
        m = report_set_metrics(gen, classifier, real, n=n, steps=1)
        rows = last_rows(run)
        gap = sum(float(r["d_real"]) - float(r["d_fake"]) for r in rows) / max(1, len(rows))
        results.append({"variant": name, "overrides": overrides, "n": n, "final_loss_d": float(rows[-1]["loss_d"]), "d_gap_last20": gap,
                        "distance": m["distance"], "attribute_accuracy": m["attribute_accuracy"], "seconds": time.perf_counter() - t0})
        print(json.dumps(results[-1]))
    lines = ["| variant | final D loss | D(real)-D(fake), last 20 iterations | distance | attribute acc |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['final_loss_d']:.3f} | {r['d_gap_last20']:.2f} | {r['distance']:.2f} | {r['attribute_accuracy']:.3f} |" for r in results]
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablations.md").write_text(f"{table}\n\ncommand: python experiments/ablations.py {' '.join(argv or [])}\n")
    (out / "ablations.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
