"""Video benchmark: generate 2 s 1280x720 24 fps clips with a one-step checkpoint, then FVD.

    python eval/benchmark_video.py --checkpoint runs/apt_video --prompts prompts.txt \
        --real real_720p/ --detector weights/i3d_torchscript.pt --out reports/video_apt
    python eval/benchmark_video.py --samples-dir already_generated/ ...   # evaluate existing clips

Generation: sample i uses prompt i mod len(prompts) and seed `--seed + i`, `--steps` Euler steps
(1 for APT), clips written as mp4 (libx264, crf 17) at `--fps` to <out>/samples/. The generator's
frame count and size must equal the benchmark's (`--num-frames-generated/--height/--width`, 49 x
720 x 1280): a mismatch is an error, not a silent resize.

Outputs in <out>: report.json (FVD result with its protocol + generation facts), report.md (a table
with this run and any `--compare` reports), plot.png (only if matplotlib is installed; otherwise a
note is printed), sample_grid.mp4 (the first 4 clips tiled 2x2 at half size).
Optional CLIP score (`--clip-dir`) of each clip's middle frame against its prompt.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

from apt.eval import benchmark_report as bench
from apt.eval.fvd import add_protocol_args, fvd_from_args, fvd_report_markdown, list_videos
from apt.eval.video_io import iter_frames, read_video, video_info, write_video


def generate_clips(a: argparse.Namespace, samples_dir: str) -> dict:
    """Generate N clips into samples_dir with the checkpoint's one-step generator; returns facts."""
    return bench.generate_samples(
        a.checkpoint, samples_dir, prompts_path=a.prompts, num_samples=a.num_videos,
        frames_height_width=(a.gen_num_frames, a.height, a.width), batch_size=a.gen_batch_size, seed=a.seed,
        steps=a.steps, device=a.device, suffix=".mp4",
        write=lambda path, clip_THWC: write_video(path, clip_THWC, fps=a.fps),
        size_flags="--num-frames-generated/--height/--width",
    )


def sample_grid_clip(paths: list[str], out_path: str, fps: float, *, cols: int = 2) -> None:
    """Tile the first cols x cols clips at 1/cols size into one mp4 (decoded in lockstep, frame by frame)."""
    paths = paths[: cols * cols]
    if not paths:
        return
    info = video_info(paths[0])
    h, w = max(2, info.height // cols // 2 * 2), max(2, info.width // cols // 2 * 2)
    rows = -(-len(paths) // cols)
    grid_frames = []
    for frames in zip(*(iter_frames(p) for p in paths)):  # stops at the shortest clip
        canvas = np.zeros((rows * h, cols * w, 3), np.uint8)
        for k, frame_HWC in enumerate(frames):
            r, c = divmod(k, cols)
            canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = np.asarray(
                Image.fromarray(frame_HWC).resize((w, h), Image.BILINEAR))
        grid_frames.append(canvas)
    write_video(out_path, np.stack(grid_frames), fps=fps)


def middle_frame_clip_score(paths: list[str], prompts: list[str], a: argparse.Namespace) -> dict:
    """CLIP score of each clip's middle frame against its prompt (streamed, one clip at a time)."""
    from apt.eval.clip_score import CLIPScorer, compute_clip_score

    scorer = CLIPScorer(a.clip_dir, a.device)
    frames = []
    for p in paths:
        n = video_info(p).num_frames or len(read_video(p))
        frames.append(read_video(p, max_frames=n // 2 + 1)[-1])
    res = compute_clip_score(frames, prompts, scorer=scorer)
    res["frame"] = "middle frame of each clip"
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_benchmark_args(p, samples="clips", height=720, width=1280, gen_batch_size=1)
    p.add_argument("--prompts", default=None, help=".txt/.json prompts (needed to generate / for CLIP)")
    p.add_argument("--num-frames-generated", dest="gen_num_frames", type=int, default=49,
                   help="frames per generated clip (the benchmark's 2 s at 24 fps + 1)")
    p.add_argument("--clip-dir", default=None, help="local CLIP directory: also report CLIP score (middle frame)")
    add_protocol_args(p)
    a = p.parse_args(argv)
    samples_dir, generation = bench.samples_for_run(a, generate_clips)

    result = fvd_from_args(a, samples_dir)
    paths = list_videos(samples_dir)
    sample_grid_clip(paths, os.path.join(a.out, "sample_grid.mp4"), a.fps)
    benchmark = {"height": a.height, "width": a.width, "num_frames_generated": a.gen_num_frames, "fps": a.fps}
    return bench.finish_run(
        result, a, samples_dir, paths, generation=generation, benchmark=benchmark,
        clip_score=(lambda used, prompts: middle_frame_clip_score(used, prompts, a)) if a.clip_dir else None,
        metric="fvd", digits=2, clip_header="CLIP (mid frame)", title="Video benchmark",
        metric_markdown=fvd_report_markdown,
    )


if __name__ == "__main__":
    main()
