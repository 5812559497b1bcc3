"""The demo's APT chain (image stage, then video stage) with a LoRA generator, beside the full fine-tune.

    OMP_NUM_THREADS=1 python eval/lora_demo.py --distill runs/demo/distill --out runs/lora_demo \
        --config full:0:3e-5 --config r4:4:3e-4 --config r16:16:3e-4

Each ``--config NAME:RANK:LR_G`` runs recipes/demo/apt_image.yaml then apt_video.yaml (the demo's settings;
``lora.rank`` RANK, alpha = rank, default targets qkv + proj; ``apt.lr_g`` LR_G) from the same distillation
checkpoint, D always fully trained from the teacher. Then, as the demo does (``apt.toy.report``): the
video-stage checkpoint with the best validation distance (256 samples) is scored on the report's prompts and
seeds (N = 5000) at 1 and 2 steps; the distillation checkpoint is scored alike. A finished stage is skipped,
so an interrupted run continues. Writes OUT/lora_demo.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apt.checkpoint import list_checkpoints  # noqa: E402
from apt.toy.demo import run_stage  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--distill", required=True, help="the distillation run or checkpoint every config starts from")
    ap.add_argument("--teacher", default="assets/demo_teacher")
    ap.add_argument("--out", default="runs/lora_demo")
    ap.add_argument("--config", action="append", required=True, metavar="NAME:RANK:LR_G")
    ap.add_argument("--video-shards", default="runs/data/toy-video")
    ap.add_argument("--image-shards", default="runs/data/toy-image")
    ap.add_argument("--num-samples", type=int, default=5000)
    args = ap.parse_args()
    from apt.inference import load_generator
    from apt.toy.classifier import load_toy_classifier
    from apt.toy.metrics import VAL_PROMPT_SEED, real_stats
    from apt.toy.report import EVAL_SEED, report_set_metrics, validation_metrics

    out = Path(args.out)
    seconds: dict = {}
    runs = {}
    for spec in args.config:
        name, rank, lr_g = spec.split(":")
        extra = [f"lora.rank={rank}", f"apt.lr_g={lr_g}", "train.progress_bar=false"]
        image = run_stage("recipes/demo/apt_image.yaml", out / name / "apt_image",
                          [f"apt.generator={args.distill}", f"apt.teacher={args.teacher}", f"data.shards={args.image_shards}", *extra], [], seconds)
        runs[name] = run_stage("recipes/demo/apt_video.yaml", out / name / "apt_video",
                               [f"apt.generator={image}", f"apt.teacher={args.teacher}", f"data.shards={args.video_shards}", *extra], [], seconds)

    classifier = load_toy_classifier("assets/toy_classifier")
    report_real = real_stats(classifier, frames=4, n=args.num_samples, seed=EVAL_SEED, cache_path=str(out / f"real_stats_4f_{args.num_samples}.npz"))
    val_real = real_stats(classifier, frames=4, n=256, seed=VAL_PROMPT_SEED, cache_path=str(out / "real_stats_4f_val256.npz"))
    rows = []
    init = load_generator(args.distill)
    m = report_set_metrics(init, classifier, report_real, n=args.num_samples)
    rows.append({"name": "distilled-1step (the init)", "distance": round(m["distance"], 2), "attribute_accuracy": round(m["attribute_accuracy"], 4)})
    for spec in args.config:
        name, rank, lr_g = spec.split(":")
        selection = []
        for ckpt in list_checkpoints(runs[name]):
            v = validation_metrics(load_generator(ckpt), classifier, val_real)
            selection.append((v["distance"], str(ckpt), v["attribute_accuracy"]))
            print(f"[lora_demo] {name} validation {ckpt.name}: distance {v['distance']:.2f}, accuracy {v['attribute_accuracy']:.3f}", flush=True)
        best = min(selection)
        gen = load_generator(best[1])
        for steps in (1, 2):
            m = report_set_metrics(gen, classifier, report_real, n=args.num_samples, steps=steps)
            rows.append({"name": f"apt-{steps}step {name}", "rank": int(rank), "lr_g": float(lr_g), "checkpoint": best[1], "val_distance": round(best[0], 2),
                         "distance": round(m["distance"], 2), "attribute_accuracy": round(m["attribute_accuracy"], 4)})
            print(f"[lora_demo] {rows[-1]}", flush=True)
    result = {"distill": args.distill, "num_samples": args.num_samples, "rows": rows, "stage_seconds": seconds, "configs": args.config}
    (out / "lora_demo.json").write_text(json.dumps(result, indent=1))
    print(f"\n{'row':<26}{'rank':>6}{'lr_g':>9}{'distance':>10}{'attr acc':>10}")
    for r in rows:
        print(f"{r['name']:<26}{r.get('rank', ''):>6}{r.get('lr_g', ''):>9}{r['distance']:>10.2f}{r['attribute_accuracy']:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
