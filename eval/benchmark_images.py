"""Image benchmark: generate 1024px images with a one-step checkpoint, then FID (+ CLIP score).

    python eval/benchmark_images.py --checkpoint runs/apt_image --prompts coco10k_captions.json \
        --real coco10k_1024/ --inception weights/inception-2015-12-05.pt --clip-dir weights/clip-vit-large-patch14 \
        --num-images 10000 --out reports/image_apt
    python eval/benchmark_images.py --samples-dir already_generated/ ...   # evaluate existing PNGs

Generation: image i uses prompt i mod len(prompts) and seed `--seed + i`, `--steps` steps (1 for
APT), saved as PNG to <out>/samples/. The generator must produce single frames of the benchmark's
size (`--height/--width`, default 1024x1024); a mismatch is an error. N defaults to 10000 (the
paper's COCO-10K). With `--samples-dir`, prompt i belongs to the i-th PNG in sorted order.

Outputs in <out>: report.json, report.md (table with this run and any `--compare` reports),
plot.png (only if matplotlib is installed; otherwise a note is printed), sample_grid.png (the
first 16 images, 4x4 at 256px).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from apt.eval.fid import fid_report_markdown, list_images
from apt.eval.video_io import read_png, write_png


def _sibling(name: str):
    """Load eval/<name>.py (the thin CLI) without making eval/ a package."""
    spec = importlib.util.spec_from_file_location(f"_apt_eval_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def prompts_for_files(paths: list[str], samples_dir: str, prompts_path: str | None) -> list[str]:
    """Prompt of each sample: from samples_dir/index.json when generated here, else prompt i mod len."""
    index_path = os.path.join(samples_dir, "index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            by_file = {e["file"]: e["prompt"] for e in json.load(f)}
        missing = [p for p in paths if os.path.basename(p) not in by_file]
        if missing:
            raise ValueError(f"{index_path} has no prompt for {missing[0]}")
        return [by_file[os.path.basename(p)] for p in paths]
    if not prompts_path:
        raise ValueError("a CLIP score needs --prompts (or an index.json in the samples directory)")
    from apt.eval.clip_score import load_prompts

    prompts = load_prompts(prompts_path)
    return [prompts[i % len(prompts)] for i in range(len(paths))]


def generate_images(a: argparse.Namespace, samples_dir: str) -> dict:
    """Generate N images into samples_dir with the checkpoint's generator; returns facts."""
    from apt.eval.clip_score import load_prompts
    from apt.inference import load_generator  # lazy: heavy, and only needed to generate

    gen = load_generator(a.checkpoint, device=a.device)
    got, want = (gen.num_frames, gen.height, gen.width), (1, a.height, a.width)
    if got != want:
        raise ValueError(
            f"checkpoint {a.checkpoint} generates (frames, height, width) = {got}, the image benchmark is "
            f"{want}; pass --height/--width to benchmark at the model's own size"
        )
    prompts = load_prompts(a.prompts)
    os.makedirs(samples_dir, exist_ok=True)
    index = []
    seconds = 0.0
    for start in range(0, a.num_images, a.gen_batch_size):
        idx = list(range(start, min(a.num_images, start + a.gen_batch_size)))
        batch_prompts = [prompts[i % len(prompts)] for i in idx]
        seeds = [a.seed + i for i in idx]
        t0 = time.time()
        imgs_BTHWC = gen.generate(batch_prompts, seeds, steps=a.steps)
        seconds += time.time() - t0
        for i, p, s, img in zip(idx, batch_prompts, seeds, imgs_BTHWC):
            name = f"{i:05d}.png"
            write_png(os.path.join(samples_dir, name), img[0])
            index.append({"file": name, "prompt": p, "seed": s})
    with open(os.path.join(samples_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return {
        "checkpoint": os.path.abspath(a.checkpoint),
        "steps": a.steps,
        "seed": a.seed,
        "num_generated": a.num_images,
        "gen_batch_size": a.gen_batch_size,
        "gen_seconds_per_sample": seconds / max(a.num_images, 1),
        "device": a.device,
        "prompts": os.path.abspath(a.prompts),
    }


def sample_grid_png(paths: list[str], out_path: str, *, cols: int = 4, tile: int = 256) -> None:
    """The first cols x cols images, each resized to tile x tile (PIL bicubic), in one PNG."""
    paths = paths[: cols * cols]
    if not paths:
        return
    rows = -(-len(paths) // cols)
    canvas = np.zeros((rows * tile, cols * tile, 3), np.uint8)
    for k, p in enumerate(paths):
        r, c = divmod(k, cols)
        canvas[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = np.asarray(
            Image.fromarray(read_png(p)).resize((tile, tile), Image.BICUBIC))
    write_png(out_path, canvas)


def comparison_markdown(rows: list[dict]) -> str:
    lines = ["| run | FID | N gen / real | steps | s/sample | CLIP score |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        g = r.get("generation", {})
        clip = r.get("clip", {}).get("clip_score")
        sps = g.get("gen_seconds_per_sample")
        lines.append(
            f"| {r.get('name', '?')} | {r['fid']:.3f} | {r['num_generated']} / {r['num_real']} | {g.get('steps', '-')} "
            f"| {'-' if sps is None else f'{sps:.3f}'} | {'-' if clip is None else f'{clip:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


def save_plot(rows: list[dict], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping plot.png (the table in report.md has the numbers)")
        return None
    has_clip = any("clip" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if has_clip else 1, figsize=(2 + 2.4 * len(rows), 3.2), squeeze=False)
    names = [r.get("name", "?") for r in rows]
    axes[0, 0].bar(names, [r["fid"] for r in rows], color="tab:blue")
    axes[0, 0].set_ylabel("FID (lower is better)")
    if has_clip:
        axes[0, 1].bar(names, [r.get("clip", {}).get("clip_score", 0.0) for r in rows], color="tab:green")
        axes[0, 1].set_ylabel("CLIP score (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    cli = _sibling("fid")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="one-step checkpoint (or run) directory to generate with")
    src.add_argument("--samples-dir", help="evaluate already generated PNGs instead of generating")
    p.add_argument("--real", required=True, help="directory or .txt list of real PNGs")
    p.add_argument("--out", required=True)
    p.add_argument("--name", default=None, help="row label in the table (default: directory name)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gen-batch-size", type=int, default=4)
    p.add_argument("--compare", nargs="*", default=[], help="other report.json files to put in the table/plot")
    cli.add_fid_args(p)
    p.set_defaults(num_images=10000)
    a = p.parse_args(argv)

    os.makedirs(a.out, exist_ok=True)
    if a.checkpoint:
        if not a.prompts:
            raise ValueError("--checkpoint needs --prompts")
        samples_dir = os.path.join(a.out, "samples")
        generation = generate_images(a, samples_dir)
    else:
        samples_dir = a.samples_dir
        generation = {"samples_dir": os.path.abspath(samples_dir), "note": "precomputed samples"}

    clip_dir, a.clip_dir = a.clip_dir, None  # CLIP below, with the prompts each sample was made from
    result = cli.run_fid(a, samples_dir)
    if clip_dir:
        from apt.eval.clip_score import clip_score_files

        skipped = {s["path"] for s in result["skipped"]["generated"]}
        used = [p for p in list_images(samples_dir) if p not in skipped][: result["num_generated"]]
        result["clip"] = clip_score_files(used, prompts_for_files(used, samples_dir, a.prompts),
                                          model_dir=clip_dir, batch_size=a.batch_size, device=a.device)
    result["name"] = a.name or os.path.basename(os.path.normpath(a.checkpoint or samples_dir))
    result["benchmark"] = {"height": a.height, "width": a.width}
    result["generation"] = generation
    rows = [result]
    for path in a.compare:
        with open(path) as f:
            rows.append(json.load(f))
    result["plot"] = save_plot(rows, os.path.join(a.out, "plot.png"))
    sample_grid_png(list_images(samples_dir), os.path.join(a.out, "sample_grid.png"))
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = f"# Image benchmark: {result['name']}\n\n" + comparison_markdown(rows) + "\n" + fid_report_markdown(result)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
