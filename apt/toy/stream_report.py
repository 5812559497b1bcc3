"""The streaming demo's table and bar (the streaming claim, docs/streaming.md): four ways to make a long toy video, scored window by window.

Rows (each a run's EMA product, ``apt.inference.load_generator``):

    whole-clip-apt        the bidirectional APT generator: the whole video in one forward (``python -m apt demo``)
    teacher-forced-1step  the causal one-step generator after teacher-forced distillation (stream_distill), streamed
    student-forced-1step  the same after adversarial training with student forcing (stream_apt), streamed: ours
    causal-teacher        the causal teacher (stream_teacher) streamed with flow.sample_steps Euler steps per chunk and CFG

Columns. Quality: distance and attribute accuracy (``apt.toy.drift``) on the window of the training length
(``data.frames`` of the streaming stages: 8 frames) that ends a video of 1x, 4x and 16x that length, i.e. frames
[0, 8), [24, 32) and [120, 128) of one 128-frame video per prompt and noise seed (a row may stop at 4x: the causal
teacher's 50 network evaluations per chunk). Speed, batch 1, one torch thread, every row timed round-robin in one
loop so that their ratios hold on a noisy machine (medians): latency to the first chunk (a
whole-clip row's first output is its whole clip), frames per second over a 4x-long stream (whole-clip rows:
back-to-back training-length clips), and the peak bytes of the tensors the call allocates
(``apt.eval.tensor_memory``) for a 1x and a 16x video, a stream's chunks dropped once made.

Every number is measured in this one run; the bar's thresholds are the issue's, not tuned.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from apt.eval.tensor_memory import PeakTensorMemory
from apt.inference import Generator
from apt.toy.bar import _line, format_bar, wall_time_lines, wall_time_note
from apt.toy.classifier import load_toy_classifier
from apt.toy.drift import long_real_batches, long_real_stats, window_metrics
from apt.toy.long_world import world_prompts
from apt.toy.report import one_torch_thread
from apt.toy.world import eval_prompts

REPORT_PROMPT_SEED, REPORT_NOISE_SEED, REAL_SEED = 2024, 30_000, 77
LENGTHS = (1, 4, 16)
"""Video lengths, in training lengths, whose last window is scored."""
STREAM_MIN_GAIN_OVER_TEACHER_FORCED = 0.10
STREAM_MAX_DROP_FROM_FIRST = 0.05
FIRST_CHUNK_MAX_RATIO = 0.2
MIN_FPS_RATIO_TO_TEACHER = 100.0
MEMORY_MAX_GROWTH = 1.10


def generate_videos(gen: Generator, prompts: list[str], seeds: list[int], *, frames: int, steps: int, cfg_scale: float, batch: int) -> torch.Tensor:
    """One video (N, C, frames, H, W) per (prompt, seed), in batches of ``batch``."""
    out = []
    for i in range(0, len(prompts), batch):
        out.append(gen.generate_tensor(prompts[i : i + batch], seeds[i : i + batch], steps=steps, cfg_scale=cfg_scale, frames=frames))
    return torch.cat(out)


def make_video(gen: Generator, prompt: str, seed: int, *, steps: int, cfg_scale: float, frames: int, first_only: bool = False) -> None:
    """One batch-1 video as a viewer gets it: a causal run streams chunks that are shown and dropped (``first_only``:
    just the first chunk); a whole-clip run makes the whole clip in one call."""
    from apt.streaming import StreamSession

    cf = gen.config.model.causal_chunk_frames
    with torch.inference_mode():
        if not cf:
            gen.generate_tensor([prompt], [seed], steps=steps, cfg_scale=cfg_scale, frames=frames)
            return
        session = StreamSession(gen, prompt, seed=seed, steps=steps, cfg_scale=cfg_scale)  # noise drawn chunk by chunk
        for _ in range(1 if first_only else frames // cf):
            session.next_chunk()


def paired_speed(entries: dict[str, tuple[Generator, str, int, float]], *, train_frames: int, calls: int) -> dict[str, dict]:
    """Batch-1 latency to the first output and frames per second of every entry (name: generator, prompt, steps,
    cfg_scale), one torch thread. The entries are timed round-robin, call k of every entry before call k + 1 of any,
    so a slow spell of a shared machine lands on all of them alike and their ratios hold; each figure is a median, over
    ``calls`` first outputs and over max(3, calls // 4) videos for the rate (a stream 4x the training length, whose
    window is full after its first quarter; a whole-clip generator's back-to-back training-length clips)."""
    for gen, prompt, _, _ in entries.values():
        gen.text_encoder.encode([prompt])  # cached: every entry times generation from the prompt's embedding

    def seconds(name: str, frames: int, first_only: bool = False) -> float:
        gen, prompt, steps, cfg = entries[name]
        t0 = time.perf_counter()
        make_video(gen, prompt, 1, steps=steps, cfg_scale=cfg, frames=frames, first_only=first_only)
        return time.perf_counter() - t0

    rate_frames = {name: 4 * train_frames if gen.config.model.causal_chunk_frames else train_frames for name, (gen, *_) in entries.items()}
    first: dict[str, list[float]] = {name: [] for name in entries}
    rate: dict[str, list[float]] = {name: [] for name in entries}
    with one_torch_thread():
        for name in entries:  # warm-up (position tables, first-call allocations)
            seconds(name, train_frames, first_only=True)
        for _ in range(calls):
            for name in entries:
                first[name].append(seconds(name, train_frames, first_only=True))
        for _ in range(max(3, calls // 4)):
            for name in entries:
                rate[name].append(rate_frames[name] / seconds(name, rate_frames[name]))
    return {name: {"first_chunk_seconds": float(np.median(first[name])), "fps": float(np.median(rate[name]))} for name in entries}


def peak_memory(gen: Generator, prompt: str, steps: int, cfg_scale: float, *, train_frames: int) -> dict:
    """Peak bytes of the tensors a batch-1 video allocates at 1x and 16x the training length (a stream's chunks are
    dropped once made, as a player shows them; a whole clip is held whole)."""
    peaks = {}
    with one_torch_thread():
        for k in (LENGTHS[0], LENGTHS[-1]):
            with PeakTensorMemory() as m:
                make_video(gen, prompt, 1, steps=steps, cfg_scale=cfg_scale, frames=k * train_frames)
            peaks[k] = m.peak
    return {"peak_bytes_1x": peaks[LENGTHS[0]], "peak_bytes_16x": peaks[LENGTHS[-1]]}


def evaluate_stream_rows(rows: list[tuple[str, Generator, int, float, int, int]], *, out_dir, num_samples: int, train_frames: int,
                         classifier_path: str = "assets/toy_classifier", timing_calls: int = 20, world: str = "long",
                         row_samples: dict[str, int] | None = None, whole_clip_reference: Generator | None = None) -> dict:
    """``rows``: (name, generator, steps, cfg_scale, generation batch, longest video in training lengths). Returns the
    report (rows, drift curves, real windows' accuracy and the real-vs-real floor); a length a row does not reach is None.
    Every row's speed is measured in one round-robin loop after the quality (``paired_speed``), with
    ``whole_clip_reference`` (a whole-clip network at one step, when there is no ``whole-clip-apt`` row) timed beside
    them for ``whole_clip_seconds``, the time of a training-length clip made whole in one step.
    Each row is scored on ``num_samples`` videos, or on the first ``row_samples[name]`` of them (a slow row); its
    distance is to real statistics of as many windows (the distance's bias depends on the count: compare distances
    only between rows of the same count, ``num_samples`` in each row).

    ``world``: the streaming world the causal rows were trained on (``apt.toy.long_world``); under ``free-shape`` /
    ``free-colour`` the causal rows are prompted without the shape / colour and every row is scored with it kept from
    the first window (a whole-clip row, trained on the demo world's captions, is prompted with every attribute)."""
    row_samples = row_samples or {}
    if any(not 0 < n <= num_samples for n in row_samples.values()):
        raise ValueError(f"row_samples must be between 1 and num_samples={num_samples}, got {row_samples}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classifier = load_toy_classifier(classifier_path)
    full_prompts = eval_prompts(num_samples, seed=REPORT_PROMPT_SEED, frames=train_frames)
    prompts = world_prompts(full_prompts, world)
    seeds = [REPORT_NOISE_SEED + i for i in range(num_samples)]
    reals = {n: long_real_stats(classifier, frames=train_frames, n=n, seed=REAL_SEED, cache_path=str(out_dir / f"real_long_{train_frames}f_{n}.npz"))
             for n in {num_samples, *row_samples.values()}}
    real = reals[num_samples]
    # Real windows of a disjoint set: the accuracy a perfect generator gets from this classifier, and the distance floor.
    # Real videos of a disjoint set, 16x long, scored like the rows: the accuracy a perfect generator gets from this
    # classifier at every length (its misreadings included), and the real-vs-real distance floor.
    held_out = list(long_real_batches(LENGTHS[-1] * train_frames, num_samples, REAL_SEED, start=num_samples))
    real_x, real_captions = torch.cat([x for x, _ in held_out]), world_prompts([c for _, caps in held_out for c in caps], world)
    real_at = {w["first_frame"]: w for w in window_metrics(classifier, real_x, real_captions, real, window_frames=train_frames,
                                                            starts=[(k - 1) * train_frames for k in LENGTHS])}
    real_row = real_at[0]
    report_rows, curves, timed = [], {}, {}
    starts = [(k - 1) * train_frames for k in LENGTHS]
    for name, gen, steps, cfg, batch, longest in rows:
        t0 = time.perf_counter()
        n = row_samples.get(name, num_samples)
        causal = bool(gen.config.model.causal_chunk_frames)
        x = generate_videos(gen, (prompts if causal else full_prompts)[:n], seeds[:n], frames=longest * train_frames, steps=steps, cfg_scale=cfg, batch=batch)
        gen_seconds = time.perf_counter() - t0
        curve = window_metrics(classifier, x, prompts[:n], reals[n], window_frames=train_frames)
        curves[name] = curve
        at = {w["first_frame"]: w for w in curve}
        # network evaluations per chunk: each step's (guidance batched beside the prompt counts two), plus, with a clean
        # cache, the previous chunk's re-encode at t = 0 (one per chunk after the first, shared by every step level)
        re_encode = 1 if causal and gen.config.model.clean_context else 0
        row = {"name": name, "num_samples": n, "steps": steps, "cfg_scale": cfg, "nfe_per_chunk": steps * (2 if cfg != 1.0 else 1) + re_encode,
               "causal": causal, "generation_seconds": round(gen_seconds, 1)}
        for k, s in zip(LENGTHS, starts):
            row[f"distance_{k}x"] = at[s]["distance"] if s in at else None
            row[f"attribute_accuracy_{k}x"] = at[s]["attribute_accuracy"] if s in at else None
        timed[name] = (gen, (prompts if causal else full_prompts)[0], steps, cfg)
        row.update(peak_memory(*timed[name], train_frames=train_frames))
        report_rows.append(row)
        accs = " / ".join(_fmt(row[f"attribute_accuracy_{k}x"], ".3f") for k in LENGTHS)
        print(f"[stream-eval] {name}: accuracy {accs} at 1x / 4x / 16x", flush=True)
    reference = "whole-clip reference"
    if whole_clip_reference is not None and "whole-clip-apt" not in timed:
        timed[reference] = (whole_clip_reference, full_prompts[0], 1, 1.0)
    speed = paired_speed(timed, train_frames=train_frames, calls=timing_calls)
    for row in report_rows:
        row.update(speed[row["name"]])
        print(f"[stream-eval] {row['name']}: first chunk {row['first_chunk_seconds'] * 1e3:.2f} ms; {row['fps']:.1f} fps", flush=True)
    whole = speed.get("whole-clip-apt", speed.get(reference))
    return {
        "rows": report_rows,
        "drift": curves,
        "real": {"attribute_accuracy": round(real_row["attribute_accuracy"], 4), "real_vs_real_floor": round(real_row["distance"], 2),
                 **{f"attribute_accuracy_{k}x": real_at[(k - 1) * train_frames]["attribute_accuracy"] for k in LENGTHS},
                 **{f"distance_{k}x": real_at[(k - 1) * train_frames]["distance"] for k in LENGTHS}},
        "train_frames": train_frames,
        "world": world,
        "lengths": list(LENGTHS),
        "num_samples": num_samples,
        "prompt_seed": REPORT_PROMPT_SEED,
        "noise_seeds": f"{REPORT_NOISE_SEED}..{REPORT_NOISE_SEED + num_samples - 1}",
        "whole_clip_seconds": None if whole is None else whole["first_chunk_seconds"],
        "torch_threads_timing": 1,
        "timing": f"every row's speed measured round-robin in one loop: medians of {timing_calls} first outputs and of "
                  f"{max(3, timing_calls // 4)} videos per row",
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def rows_by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in rows}


def check_stream_bar(report: dict) -> list[dict]:
    """The issue's bar, one dict per line (``line``, ``value``, ``op``, ``threshold``, ``met``), as ``apt.toy.bar``."""
    r = rows_by_name(report["rows"])
    missing = {"teacher-forced-1step", "student-forced-1step", "causal-teacher"} - set(r)
    if missing:
        raise KeyError(f"report rows lack {sorted(missing)} (has {sorted(r)})")
    ours, tf, teacher = r["student-forced-1step"], r["teacher-forced-1step"], r["causal-teacher"]
    lines = [
        _line("student-forced attribute accuracy at 4x the training length", ours["attribute_accuracy_4x"], ">=",
              tf["attribute_accuracy_4x"] + STREAM_MIN_GAIN_OVER_TEACHER_FORCED),
        _line("student-forced attribute accuracy at 4x vs its first window", ours["attribute_accuracy_4x"], ">=",
              ours["attribute_accuracy_1x"] - STREAM_MAX_DROP_FROM_FIRST),
    ]
    if report.get("whole_clip_seconds"):
        lines.append(_line("first-chunk latency / time of a training-length clip made whole in one step",
                           ours["first_chunk_seconds"] / report["whole_clip_seconds"], "<=", FIRST_CHUNK_MAX_RATIO))
    lines += [
        _line("frames per second / the causal teacher's", ours["fps"] / teacher["fps"], ">=", MIN_FPS_RATIO_TO_TEACHER),
        _line("peak tensor memory at 16x / at 1x the training length", ours["peak_bytes_16x"] / ours["peak_bytes_1x"], "<=", MEMORY_MAX_GROWTH),
    ]
    return lines + wall_time_lines(report, "streaming demo wall time, seconds")


def print_stream_table(report: dict) -> None:
    f = report["train_frames"]
    print(f"\nwindows of {f} frames (the training length) ending a video of 1x / 4x / 16x that length; N videos per row "
          "(distances compare between rows of the same N)")
    print(f"{'row':<22}{'N':>6}{'NFE/chunk':>10}{'dist 1x':>9}{'dist 4x':>9}{'dist 16x':>10}{'acc 1x':>8}{'acc 4x':>8}{'acc 16x':>9}"
          f"{'1st chunk ms':>14}{'fps b1':>9}{'MB 1x':>8}{'MB 16x':>8}")
    for r in report["rows"]:
        d = [_fmt(r[f"distance_{k}x"], ".1f") for k in LENGTHS]
        a = [_fmt(r[f"attribute_accuracy_{k}x"], ".3f") for k in LENGTHS]
        print(f"{r['name']:<22}{r.get('num_samples', report['num_samples']):>6}{r['nfe_per_chunk']:>10}{d[0]:>9}{d[1]:>9}{d[2]:>10}{a[0]:>8}{a[1]:>8}{a[2]:>9}"
              f"{r['first_chunk_seconds'] * 1e3:>14.2f}{r['fps']:>9.1f}{r['peak_bytes_1x'] / 2**20:>8.2f}{r['peak_bytes_16x'] / 2**20:>8.2f}")
    real = report["real"]
    if "attribute_accuracy_4x" in real:  # real videos, scored alike: what a perfect generator gets
        d = [_fmt(real[f"distance_{k}x"], ".1f") for k in LENGTHS]
        a = [_fmt(real[f"attribute_accuracy_{k}x"], ".3f") for k in LENGTHS]
        print(f"{'real videos':<22}{report['num_samples']:>6}{'-':>10}{d[0]:>9}{d[1]:>9}{d[2]:>10}{a[0]:>8}{a[1]:>8}{a[2]:>9}")
    print(f"real {report.get('world', 'long')}-world windows: attribute accuracy {real['attribute_accuracy']:.3f}; "
          f"real-vs-real floor {real['real_vs_real_floor']:.2f}")
    print(format_bar(check_stream_bar(report), "the streaming claim") + wall_time_note(report) + "\n")
