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
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from apt.eval.fvd import fvd_report_markdown, list_videos
from apt.eval.video_io import iter_frames, read_video, video_info, write_video


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


def generate_clips(a: argparse.Namespace, samples_dir: str) -> dict:
    """Generate N clips into samples_dir with the checkpoint's one-step generator; returns facts."""
    from apt.eval.clip_score import load_prompts
    from apt.inference import load_generator  # lazy: heavy, and only needed to generate

    gen = load_generator(a.checkpoint, device=a.device)
    got = (gen.num_frames, gen.height, gen.width)
    want = (a.gen_num_frames, a.height, a.width)
    if got != want:
        raise ValueError(
            f"checkpoint {a.checkpoint} generates (frames, height, width) = {got}, the benchmark is {want}; "
            "pass --num-frames-generated/--height/--width to benchmark at the model's own size"
        )
    prompts = load_prompts(a.prompts)
    os.makedirs(samples_dir, exist_ok=True)
    index = []
    seconds = 0.0
    for start in range(0, a.num_videos, a.gen_batch_size):
        idx = list(range(start, min(a.num_videos, start + a.gen_batch_size)))
        batch_prompts = [prompts[i % len(prompts)] for i in idx]
        seeds = [a.seed + i for i in idx]
        t0 = time.time()
        clips_BTHWC = gen.generate(batch_prompts, seeds, steps=a.steps)
        seconds += time.time() - t0
        for i, p, s, clip in zip(idx, batch_prompts, seeds, clips_BTHWC):
            name = f"{i:05d}.mp4"
            write_video(os.path.join(samples_dir, name), clip, fps=a.fps)
            index.append({"file": name, "prompt": p, "seed": s})
    with open(os.path.join(samples_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return {
        "checkpoint": os.path.abspath(a.checkpoint),
        "steps": a.steps,
        "seed": a.seed,
        "num_generated": a.num_videos,
        "gen_batch_size": a.gen_batch_size,
        "gen_seconds_per_sample": seconds / max(a.num_videos, 1),
        "device": a.device,
        "prompts": os.path.abspath(a.prompts),
    }


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


def comparison_rows(result: dict, compare: list[str]) -> list[dict]:
    rows = [result]
    for path in compare:
        with open(path) as f:
            rows.append(json.load(f))
    return rows


def comparison_markdown(rows: list[dict]) -> str:
    lines = ["| run | FVD | N gen / real | steps | s/sample | CLIP (mid frame) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        g = r.get("generation", {})
        clip = r.get("clip", {}).get("clip_score")
        sps = g.get("gen_seconds_per_sample")
        lines.append(
            f"| {r.get('name', '?')} | {r['fvd']:.2f} | {r['num_generated']} / {r['num_real']} | {g.get('steps', '-')} "
            f"| {'-' if sps is None else f'{sps:.3f}'} | {'-' if clip is None else f'{clip:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


def save_plot(rows: list[dict], key: str, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping plot.png (the table in report.md has the numbers)")
        return None
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(rows), 3.2))
    ax.bar([r.get("name", "?") for r in rows], [r[key] for r in rows], color="tab:blue")
    ax.set_ylabel(key.upper() + " (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    cli = _sibling("fvd")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="one-step checkpoint (or run) directory to generate with")
    src.add_argument("--samples-dir", help="evaluate already generated clips instead of generating")
    p.add_argument("--real", required=True, help="directory or .txt list of real clips")
    p.add_argument("--prompts", default=None, help=".txt/.json prompts (needed to generate / for CLIP)")
    p.add_argument("--out", required=True)
    p.add_argument("--name", default=None, help="row label in the table (default: directory name)")
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--num-frames-generated", dest="gen_num_frames", type=int, default=49,
                   help="frames per generated clip (the benchmark's 2 s at 24 fps + 1)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gen-batch-size", type=int, default=1)
    p.add_argument("--clip-dir", default=None, help="local CLIP directory: also report CLIP score (middle frame)")
    p.add_argument("--compare", nargs="*", default=[], help="other report.json files to put in the table/plot")
    cli.add_protocol_args(p)
    a = p.parse_args(argv)

    os.makedirs(a.out, exist_ok=True)
    generation: dict = {}
    if a.checkpoint:
        if not a.prompts:
            raise ValueError("--checkpoint needs --prompts")
        samples_dir = os.path.join(a.out, "samples")
        generation = generate_clips(a, samples_dir)
    else:
        samples_dir = a.samples_dir
        generation = {"samples_dir": os.path.abspath(samples_dir), "note": "precomputed samples"}

    result = cli.run_fvd(a, samples_dir)
    result["name"] = a.name or os.path.basename(os.path.normpath(a.checkpoint or samples_dir))
    result["benchmark"] = {"height": a.height, "width": a.width, "num_frames_generated": a.gen_num_frames, "fps": a.fps}
    result["generation"] = generation
    paths = list_videos(samples_dir)
    if a.clip_dir:
        used = [p for p in paths if p not in {s["path"] for s in result["skipped"]["generated"]}]
        used = used[: result["num_generated"]]
        result["clip"] = middle_frame_clip_score(used, prompts_for_files(used, samples_dir, a.prompts), a)

    rows = comparison_rows(result, a.compare)
    result["plot"] = save_plot(rows, "fvd", os.path.join(a.out, "plot.png"))
    sample_grid_clip(paths, os.path.join(a.out, "sample_grid.mp4"), a.fps)
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = f"# Video benchmark: {result['name']}\n\n" + comparison_markdown(rows) + "\n" + fvd_report_markdown(result)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
