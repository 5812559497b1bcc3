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
import os

import numpy as np
from PIL import Image

from apt.eval import benchmark_report as bench
from apt.eval.fid import add_fid_args, fid_from_args, fid_report_markdown, list_images
from apt.eval.video_io import read_png, write_png


def generate_images(a: argparse.Namespace, samples_dir: str) -> dict:
    """Generate N images into samples_dir with the checkpoint's generator; returns facts."""
    return bench.generate_samples(
        a.checkpoint, samples_dir, prompts_path=a.prompts, num_samples=a.num_images,
        frames_height_width=(1, a.height, a.width), batch_size=a.gen_batch_size, seed=a.seed, steps=a.steps,
        device=a.device, suffix=".png", write=lambda path, img_THWC: write_png(path, img_THWC[0]),
        benchmark="the image benchmark",
    )


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


def clip_score_images(paths: list[str], prompts: list[str], a: argparse.Namespace) -> dict:
    """CLIP score of each image against its prompt (`--clip-dir`)."""
    from apt.eval.clip_score import clip_score_files

    return clip_score_files(paths, prompts, model_dir=a.clip_dir, batch_size=a.batch_size, device=a.device)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_benchmark_args(p, samples="PNGs", height=1024, width=1024, gen_batch_size=4)
    add_fid_args(p)
    p.set_defaults(num_images=10000)
    a = p.parse_args(argv)
    samples_dir, generation = bench.samples_for_run(a, generate_images)

    # CLIP in finish_run, with the prompts each sample was made from, not in fid_from_args.
    result = fid_from_args(argparse.Namespace(**{**vars(a), "clip_dir": None}), samples_dir)
    paths = list_images(samples_dir)
    sample_grid_png(paths, os.path.join(a.out, "sample_grid.png"))
    return bench.finish_run(
        result, a, samples_dir, paths, generation=generation, benchmark={"height": a.height, "width": a.width},
        clip_score=(lambda used, prompts: clip_score_images(used, prompts, a)) if a.clip_dir else None,
        metric="fid", digits=3, clip_header="CLIP score", title="Image benchmark",
        metric_markdown=fid_report_markdown,
    )


if __name__ == "__main__":
    main()
