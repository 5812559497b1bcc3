"""What the image (FID) and video (FVD) benchmarks and the metric CLIs share.

`eval/benchmark_images.py` and `eval/benchmark_video.py` generate N samples with a one-step
checkpoint (or take a directory of existing ones), score them, and write a report; `eval/fid.py`
and `eval/fvd.py` score two directories. This module holds the pieces they have in common:
the options, sample generation (sample i: prompt i mod len(prompts), seed `seed + i`), the prompt
of each sample for a CLIP score, the comparison table and plot, and report.json / report.md.
The metrics themselves live in `apt.eval.fid` and `apt.eval.fvd`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

SampleWriter = Callable[[str, Any], None]
"""write(path, sample) for one generated sample: uint8 (T, H, W, 3)."""


# --------------------------------------------------------------------------- options


def add_benchmark_args(p: argparse.ArgumentParser, *, samples: str, height: int, width: int,
                       gen_batch_size: int) -> None:
    """Options of a benchmark run: where samples come from, the benchmark size, seeds, the table.

    samples: what the sample files are, for the help text ("PNGs", "clips").
    """
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="one-step checkpoint (or run) directory to generate with")
    src.add_argument("--samples-dir", help=f"evaluate already generated {samples} instead of generating")
    p.add_argument("--real", required=True, help=f"directory or .txt list of real {samples}")
    p.add_argument("--out", required=True)
    p.add_argument("--name", default=None, help="row label in the table (default: directory name)")
    p.add_argument("--height", type=int, default=height)
    p.add_argument("--width", type=int, default=width)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gen-batch-size", type=int, default=gen_batch_size)
    p.add_argument("--compare", nargs="*", default=[], help="other report.json files to put in the table/plot")


def metric_cli(
    argv: list[str] | None,
    *,
    description: str,
    files: str,
    add_args: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace, str], dict],
    markdown: Callable[[dict, argparse.Namespace], str],
) -> dict:
    """`--gen`, `--real`, `--out` plus `add_args`; result = run(args, args.gen); writes the report."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gen", required=True, help=f"directory or .txt list of generated {files}")
    p.add_argument("--real", required=True, help=f"directory or .txt list of real {files}")
    p.add_argument("--out", required=True, help="report directory")
    add_args(p)
    a = p.parse_args(argv)
    result = run(a, a.gen)
    write_report(a.out, result, markdown(result, a))
    return result


# --------------------------------------------------------------------------- samples


def generate_samples(
    checkpoint: str,
    samples_dir: str,
    *,
    prompts_path: str,
    num_samples: int,
    frames_height_width: tuple[int, int, int],
    batch_size: int,
    seed: int,
    steps: int,
    device: str,
    suffix: str,
    write: SampleWriter,
    benchmark: str = "the benchmark",
    size_flags: str = "--height/--width",
) -> dict:
    """Generate `num_samples` into samples_dir/00000<suffix>, ... plus index.json; returns the facts.

    Sample i uses prompt i mod len(prompts) and seed `seed + i`. The generator's
    (frames, height, width) must equal `frames_height_width`: a mismatch is a ValueError naming
    `size_flags`, never a silent resize.
    """
    from apt.eval.clip_score import load_prompts
    from apt.inference import load_generator  # lazy: heavy, and only needed to generate

    gen = load_generator(checkpoint, device=device)
    got, want = (gen.num_frames, gen.height, gen.width), tuple(frames_height_width)
    if got != want:
        raise ValueError(
            f"checkpoint {checkpoint} generates (frames, height, width) = {got}, {benchmark} is {want}; "
            f"pass {size_flags} to benchmark at the model's own size"
        )
    prompts = load_prompts(prompts_path)
    os.makedirs(samples_dir, exist_ok=True)
    index = []
    seconds = 0.0
    for start in range(0, num_samples, batch_size):
        idx = list(range(start, min(num_samples, start + batch_size)))
        batch_prompts = [prompts[i % len(prompts)] for i in idx]
        seeds = [seed + i for i in idx]
        t0 = time.time()
        samples_BTHWC = gen.generate(batch_prompts, seeds, steps=steps)
        seconds += time.time() - t0
        for i, p, s, sample_THWC in zip(idx, batch_prompts, seeds, samples_BTHWC):
            name = f"{i:05d}{suffix}"
            write(os.path.join(samples_dir, name), sample_THWC)
            index.append({"file": name, "prompt": p, "seed": s})
    with open(os.path.join(samples_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return {
        "checkpoint": os.path.abspath(checkpoint),
        "steps": steps,
        "seed": seed,
        "num_generated": num_samples,
        "gen_batch_size": batch_size,
        "gen_seconds_per_sample": seconds / max(num_samples, 1),
        "device": device,
        "prompts": os.path.abspath(prompts_path),
    }


def samples_for_run(a: argparse.Namespace,
                    generate: Callable[[argparse.Namespace, str], dict]) -> tuple[str, dict]:
    """Create `a.out`; -> (samples directory, generation facts): generated there, or `a.samples_dir`."""
    os.makedirs(a.out, exist_ok=True)
    if a.checkpoint:
        if not a.prompts:
            raise ValueError("--checkpoint needs --prompts")
        samples_dir = os.path.join(a.out, "samples")
        return samples_dir, generate(a, samples_dir)
    return a.samples_dir, {"samples_dir": os.path.abspath(a.samples_dir), "note": "precomputed samples"}


def prompts_for_files(paths: Sequence[str], samples_dir: str, prompts_path: str | None) -> list[str]:
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


# --------------------------------------------------------------------------- report


def comparison_rows(result: dict, compare: Sequence[str]) -> list[dict]:
    """This run's result, then each `--compare` report.json."""
    rows = [result]
    for path in compare:
        with open(path) as f:
            rows.append(json.load(f))
    return rows


def comparison_markdown(rows: Sequence[dict], *, metric: str, digits: int, clip_header: str) -> str:
    """One table row per run: metric (key `metric`, shown upper-case), N, steps, s/sample, CLIP score."""
    lines = [f"| run | {metric.upper()} | N gen / real | steps | s/sample | {clip_header} |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        g = r.get("generation", {})
        clip = r.get("clip", {}).get("clip_score")
        sps = g.get("gen_seconds_per_sample")
        lines.append(
            f"| {r.get('name', '?')} | {r[metric]:.{digits}f} | {r['num_generated']} / {r['num_real']} "
            f"| {g.get('steps', '-')} | {'-' if sps is None else f'{sps:.3f}'} "
            f"| {'-' if clip is None else f'{clip:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


def save_plot(rows: Sequence[dict], path: str, *, metric: str) -> str | None:
    """Bar chart of `metric` per run (+ a CLIP score panel if any run has one); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping plot.png (the table in report.md has the numbers)")
        return None
    has_clip = any("clip" in r for r in rows)
    ncols = 2 if has_clip else 1
    fig, axes = plt.subplots(1, ncols, figsize=(0.5 + ncols * (1 + 1.2 * len(rows)), 3.2), squeeze=False)
    names = [r.get("name", "?") for r in rows]
    axes[0, 0].bar(names, [r[metric] for r in rows], color="tab:blue")
    axes[0, 0].set_ylabel(f"{metric.upper()} (lower is better)")
    if has_clip:
        axes[0, 1].bar(names, [r.get("clip", {}).get("clip_score", 0.0) for r in rows], color="tab:green")
        axes[0, 1].set_ylabel("CLIP score (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out: str, result: dict, markdown: str) -> None:
    """<out>/report.json (the result) and <out>/report.md (`markdown`, also printed)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown)
    print(markdown)


def finish_run(
    result: dict,
    a: argparse.Namespace,
    samples_dir: str,
    paths: Sequence[str],
    *,
    generation: dict,
    benchmark: dict,
    clip_score: Callable[[list[str], list[str]], dict] | None,
    metric: str,
    digits: int,
    clip_header: str,
    title: str,
    metric_markdown: Callable[[dict], str],
) -> dict:
    """Complete `result` and write <a.out>/plot.png, report.json and report.md; returns `result`.

    Adds the row label (`--name`, else the checkpoint's or samples directory's name), the
    benchmark settings, the generation facts and, with `clip_score(files, prompts)`, the CLIP
    score of the files the metric used (`paths` minus skipped ones, first `num_generated`).
    report.md: `# <title>: <name>`, the comparison table with the `--compare` reports, then
    `metric_markdown(result)`.
    """
    result["name"] = a.name or os.path.basename(os.path.normpath(a.checkpoint or samples_dir))
    result["benchmark"] = benchmark
    result["generation"] = generation
    if clip_score is not None:
        skipped = {s["path"] for s in result["skipped"]["generated"]}
        used = [p for p in paths if p not in skipped][: result["num_generated"]]
        result["clip"] = clip_score(used, prompts_for_files(used, samples_dir, a.prompts))
    rows = comparison_rows(result, a.compare)
    result["plot"] = save_plot(rows, os.path.join(a.out, "plot.png"), metric=metric)
    table = comparison_markdown(rows, metric=metric, digits=digits, clip_header=clip_header)
    write_report(a.out, result, f"# {title}: {result['name']}\n\n" + table + "\n" + metric_markdown(result))
    return result
