"""The demo's evaluation table: teacher (25 steps + CFG) vs distilled vs APT (1 and 2 steps).

Protocol (every number in the report comes from this one run):
- Evaluation prompts: ``eval_prompts(N, seed=EVAL_SEED)`` (balanced over attributes), noise seeds
  10_000 + i; N = ``REPORT_SAMPLES`` (5000) in the demo. The APT checkpoint is chosen on a disjoint
  validation set (``validation_metrics``: VAL_PROMPT_SEED prompts, noise seeds VAL_NOISE_SEED + i, 256
  samples) among the checkpoints of the video-stage run, as docs/design.md §5 explains (the raw APT
  trajectory oscillates).
- ``distance``: Fréchet distance to N real toy clips in the toy classifier's feature space;
  ``attribute_accuracy``: share of samples whose shape, colour, direction and background all match
  the prompt (``apt.toy.metrics``). The real-vs-real floor (two disjoint real sets of size N)
  is reported alongside.
- ``seconds_per_sample``: batch-1 wall time per sample, one torch thread: the median latency of a call, over
  five turns per row taken in turn after a warm-up (each turn >= 3 calls and >= 0.4 s);
  ``seconds_per_sample_batched``: wall time of the whole evaluation set in batches of 250 with all
  torch threads, per sample. Both time generation from the prompt's text embedding: every row's
  encoder has the prompts cached before its timing starts. Encoding a new prompt costs the same for
  every row and is reported on its own (``text_encode_seconds``, batch 1, one thread), with the batch-1
  speed-ups it leaves when added to every row (``speedup_batch1_with_text``).
  ``nfe``: network evaluations per sample (CFG counts two).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import time
from pathlib import Path

import numpy as np
import torch

from apt.inference import Generator, load_generator
from apt.media import to_uint8
from apt.toy.bar import check_bar, format_bar, wall_time_note
from apt.toy.classifier import load_toy_classifier
from apt.toy.metrics import VAL_NOISE_SEED, VAL_PROMPT_SEED, evaluate_samples, real_stats, real_vs_real_floor
from apt.toy.side_by_side import save_side_by_side
from apt.toy.world import eval_prompts

EVAL_SEED = 1234
EVAL_NOISE_SEED = 10_000
"""The report's sample i uses noise seed EVAL_NOISE_SEED + i."""
SPLITS = {"validation": (VAL_PROMPT_SEED, VAL_NOISE_SEED), "report": (EVAL_SEED, EVAL_NOISE_SEED)}
"""Prompt seed (the real set's too) and first noise seed of each split: the validation set the demo picks its
APT checkpoint on, and the report's set."""
BATCH = 250
REPORT_SAMPLES = 5000
"""N of the demo's report. At N = 1000 (until 2026-12-05) the real-vs-real floor was 5.0 against the teacher's 6.2 and
the rows' small-sample biases differed enough to move the bar's ratios by 0.06 and 0.30 between two draws of the prompts
and seeds; at 5000 the floor is 0.8-1.1 (``experiments/toy_distance_vs_n.py``, docs/log/demo_tuning.md fifteenth round)."""


def generate_seeded(gen: Generator, prompts: list[str], seeds: list[int], *, steps: int, cfg_scale: float | None = None, frames: int | None = None) -> torch.Tensor:
    """One sample (B, C, T, H, W) per (prompt, noise seed), in batches of BATCH."""
    return torch.cat([gen.generate_tensor(prompts[i : i + BATCH], seeds[i : i + BATCH], steps=steps, cfg_scale=cfg_scale, frames=frames)
                      for i in range(0, len(prompts), BATCH)])


class NoiseScaled(torch.nn.Module):
    """net'(x) = net(s x) - (s - 1) x, so that the one-step sample z - net'(z, T) is s z - net(s z, T)."""

    def __init__(self, net: torch.nn.Module, scale: float):
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x: torch.Tensor, t: torch.Tensor, text) -> torch.Tensor:
        return self.net(self.scale * x, t, text) - (self.scale - 1.0) * x


@contextlib.contextmanager
def noise_scaled(gen: Generator, scale: float):
    """``gen`` samples one step from noise scaled by ``scale`` inside the block (the wrapper means that
    for one-step sampling only; scale 1 leaves ``gen`` as it is)."""
    net = gen.net
    gen.net = NoiseScaled(net, scale) if scale != 1.0 else net
    try:
        yield gen
    finally:
        gen.net = net


def generate_all(gen: Generator, prompts: list[str], seed0: int, *, steps: int, cfg_scale: float | None = None, frames: int | None = None) -> tuple[torch.Tensor, float]:
    """All samples (B, C, T, H, W), noise seeds seed0, seed0 + 1, ..., and the batched seconds per sample."""
    t0 = time.perf_counter()
    x = generate_seeded(gen, prompts, [seed0 + i for i in range(len(prompts))], steps=steps, cfg_scale=cfg_scale, frames=frames)
    return x, (time.perf_counter() - t0) / len(prompts)


def add_validation_arguments(ap: argparse.ArgumentParser) -> None:
    """The command-line arguments of the scripts that score checkpoints on the validation split (experiments/toy_validate.py, experiments/toy_gap.py)."""
    ap.add_argument("checkpoints", nargs="+", help="checkpoint or run directories")
    ap.add_argument("--steps", type=int, default=1, help="sampling steps (1 = the one-step generator)")
    ap.add_argument("--cfg", type=float, default=1.0, help="CFG scale (the demo's teacher row: 3)")
    ap.add_argument("--frames", type=int, default=4, help="frames per sample (the classifier's clips)")
    ap.add_argument("--num-samples", type=int, default=256, help="the training evaluation's default (the report's N: 5000)")
    ap.add_argument("--split", choices=sorted(SPLITS), default="validation", help="the validation set, or the demo report's prompts and seeds")
    ap.add_argument("--classifier", default="assets/toy_classifier")


def split_metrics(gen: Generator, classifier, real, *, split: str, n: int, steps: int = 1, cfg_scale: float | None = None, frames: int | None = None) -> dict:
    """Toy metrics of ``gen`` on the first n prompts and noise seeds of ``split`` (``SPLITS``), against ``real``
    (``real_stats`` of the same n and the split's prompt seed); ``frames`` defaults to the generator's own."""
    prompt_seed, noise_seed = SPLITS[split]
    frames = frames or gen.num_frames
    prompts = eval_prompts(n, seed=prompt_seed, frames=frames)
    x, _ = generate_all(gen, prompts, noise_seed, steps=steps, cfg_scale=cfg_scale, frames=frames)
    return evaluate_samples(classifier, x, prompts, real)


def validation_metrics(gen: Generator, classifier, val_real, *, n: int = 256, steps: int = 1, cfg_scale: float | None = None, frames: int | None = None) -> dict:
    """``split_metrics`` on the validation split (``apt.toy.metrics.VAL_PROMPT_SEED``)."""
    return split_metrics(gen, classifier, val_real, split="validation", n=n, steps=steps, cfg_scale=cfg_scale, frames=frames)


def report_set_metrics(gen: Generator, classifier, report_real, *, n: int = REPORT_SAMPLES, steps: int = 1, cfg_scale: float | None = None, frames: int | None = None) -> dict:
    """``split_metrics`` on the report's prompts (``EVAL_SEED``) and noise seeds (``EVAL_NOISE_SEED``)."""
    return split_metrics(gen, classifier, report_real, split="report", n=n, steps=steps, cfg_scale=cfg_scale, frames=frames)


@contextlib.contextmanager
def one_torch_thread():
    """Batch-1 timings run on one torch thread (intra-op threads only add overhead on tensors this small,
    for every row alike); the caller's thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def batch1_seconds(rows: list[tuple[Generator, int, float | None]], prompts: list[str], *, rounds: int = 5, min_calls: int = 3, min_seconds: float = 0.4) -> list[float]:
    """Batch-1 latency of each (generator, steps, cfg_scale) row, on one torch thread: the median of its calls'
    times (``batch1_call_times``). The median of single calls ignores the short stalls of a shared machine: in four
    measurements, two rows of the same network differed by up to 9% with the median of each turn's mean call and
    by up to 3.4% with the median call (``experiments/batch1_timing.py``, docs/log/demo_tuning.md, thirteenth round)."""
    times = batch1_call_times(rows, prompts, rounds=rounds, min_calls=min_calls, min_seconds=min_seconds)
    return [float(np.median([t for turn in row for t in turn])) for row in times]


def batch1_call_times(rows: list[tuple[Generator, int, float | None]], prompts: list[str], *, rounds: int = 5, min_calls: int = 3, min_seconds: float = 0.4) -> list[list[list[float]]]:
    """Seconds of every timed batch-1 call, per row and turn (``[row][turn][call]``), on one torch thread. The rows
    are timed in turn, ``rounds`` times (each turn at least ``min_calls`` calls and ``min_seconds``), after a
    warm-up, so a change of machine load during the measurement reaches every row alike.

    Every row's text encoder has all ``prompts`` cached first: otherwise a row would pay the encoder on the
    calls that meet a caption for the first time, and the rows meet different numbers of new captions
    (a one-step row makes ~30 calls for each of the teacher's). ``text_encode_seconds`` times the encoder."""
    seeds = itertools.count()  # call k: noise seed k, prompt k mod len(prompts)

    def one_call(gen: Generator, steps: int, cfg_scale: float | None) -> float:
        k = next(seeds)
        t0 = time.perf_counter()
        gen.generate_tensor([prompts[k % len(prompts)]], [k], steps=steps, cfg_scale=cfg_scale)
        return time.perf_counter() - t0

    with one_torch_thread():
        for gen, _, _ in rows:
            gen.text_encoder.encode(prompts)
        for row in rows:  # warm-up
            for _ in range(3):
                one_call(*row)
        times: list[list[list[float]]] = [[] for _ in rows]
        for _ in range(rounds):
            for r, row in enumerate(rows):
                turn, t0 = [], time.perf_counter()
                while len(turn) < min_calls or time.perf_counter() - t0 < min_seconds:
                    turn.append(one_call(*row))
                times[r].append(turn)
        return times


def text_encode_seconds(text_encoder, prompts: list[str], *, calls: int = 64) -> float:
    """Median batch-1 latency of encoding a prompt the encoder has not cached, one torch thread."""
    with one_torch_thread():
        text_encoder.encode(prompts[:1], cache=False)  # warm-up
        times = []
        for k in range(calls):
            t0 = time.perf_counter()
            text_encoder.encode([prompts[k % len(prompts)]], cache=False)
            times.append(time.perf_counter() - t0)
        return float(np.median(times))


def evaluate_rows(*, teacher, distilled, apt_candidates: list, out_dir, num_samples: int, classifier_path: str = "assets/toy_classifier", torch_threads: int = 1) -> dict:
    out_dir = Path(out_dir)
    classifier = load_toy_classifier(classifier_path)
    t_gen = load_generator(teacher)
    frames = t_gen.num_frames
    prompts = eval_prompts(num_samples, seed=EVAL_SEED, frames=frames)
    real = real_stats(classifier, frames=frames, n=num_samples, seed=EVAL_SEED, cache_path=str(out_dir / f"real_stats_{frames}f_{num_samples}.npz"))
    floor = real_vs_real_floor(classifier, frames=frames, n=num_samples, seed=EVAL_SEED, first=real)
    val_real = real_stats(classifier, frames=frames, n=256, seed=VAL_PROMPT_SEED, cache_path=str(out_dir / f"real_stats_{frames}f_val256.npz"))

    # Pick the APT checkpoint on the validation set.
    selection = []
    for ckpt in apt_candidates:
        m = validation_metrics(load_generator(ckpt), classifier, val_real)
        selection.append({"checkpoint": str(ckpt), "val_distance": m["distance"], "val_attribute_accuracy": m["attribute_accuracy"]})
        print(f"[eval] validation {ckpt}: distance {m['distance']:.2f}, attribute accuracy {m['attribute_accuracy']:.3f}")
    best = min(selection, key=lambda s: s["val_distance"])["checkpoint"]
    a_gen = load_generator(best)

    rows_spec = [
        ("teacher-25step-cfg", t_gen, t_gen.config.flow.sample_steps, t_gen.config.flow.cfg_scale),
        ("distilled-1step", load_generator(distilled), 1, 1.0),
        ("apt-1step", a_gen, 1, 1.0),
        ("apt-2step", a_gen, 2, 1.0),
    ]
    rows, side = [], []
    seconds_b1 = batch1_seconds([(gen, steps, cfg) for _, gen, steps, cfg in rows_spec], prompts)
    seconds_text = text_encode_seconds(t_gen.text_encoder, prompts)
    for (name, gen, steps, cfg), sec1 in zip(rows_spec, seconds_b1):
        x, sec_batched = generate_all(gen, prompts, EVAL_NOISE_SEED, steps=steps, cfg_scale=cfg)
        m = evaluate_samples(classifier, x, prompts, real)
        nfe = steps * (2 if cfg != 1.0 else 1)
        rows.append({"name": name, "nfe": nfe, "distance": round(m["distance"], 2), "attribute_accuracy": round(m["attribute_accuracy"], 4),
                     "per_attribute": {k: round(v, 4) for k, v in m.get("per_attribute", {}).items()},
                     "seconds_per_sample": sec1, "seconds_per_sample_batched": sec_batched})
        side.append(to_uint8(x[:8]))
        print(f"[eval] {name}: distance {m['distance']:.2f}, attribute accuracy {m['attribute_accuracy']:.3f}, {sec1 * 1e3:.2f} ms/sample (batch 1)")
    teacher_row = rows[0]
    for r in rows:
        r["speedup_batch1"] = teacher_row["seconds_per_sample"] / r["seconds_per_sample"]
        r["speedup_batched"] = teacher_row["seconds_per_sample_batched"] / r["seconds_per_sample_batched"]
        r["speedup_batch1_with_text"] = (teacher_row["seconds_per_sample"] + seconds_text) / (r["seconds_per_sample"] + seconds_text)
    # Side by side: for each prompt, the four rows one under the other, labelled.
    save_side_by_side(np.stack(side, axis=1), [r["name"] for r in rows], prompts[:8], out_dir)  # (8 prompts, 4 rows, T, H, W, C)
    (out_dir / "side_by_side_prompts.txt").write_text("rows per prompt: " + ", ".join(r["name"] for r in rows) + "\n" + "\n".join(prompts[:8]) + "\n")
    return {
        "rows": rows,
        "text_encode_seconds": seconds_text,
        "real_vs_real_floor": round(floor, 2),
        "num_samples": num_samples,
        "eval_prompt_seed": EVAL_SEED,
        "noise_seeds": f"{EVAL_NOISE_SEED}..{EVAL_NOISE_SEED + num_samples - 1}",
        "apt_checkpoint": best,
        "apt_selection": selection,
        "torch_threads": torch_threads,
    }


def print_table(report: dict) -> None:
    print(f"\n{'row':<22}{'NFE':>5}{'distance':>11}{'attr acc':>10}{'ms/sample b1':>14}{'ms/sample bat':>15}{'speedup b1':>12}")
    for r in report["rows"]:
        print(f"{r['name']:<22}{r['nfe']:>5}{r['distance']:>11.2f}{r['attribute_accuracy']:>10.3f}{r['seconds_per_sample'] * 1e3:>14.2f}"
              f"{r['seconds_per_sample_batched'] * 1e3:>15.3f}{r['speedup_batch1']:>12.1f}")
    with_text = ", ".join(f"{r['name']} {r['speedup_batch1_with_text']:.1f}x" for r in report["rows"][1:])
    print(f"text encoding (not in the figures above, the same for every row): {report['text_encode_seconds'] * 1e3:.2f} ms per new prompt; "
          f"batch-1 speed-ups with it: {with_text}")
    print(f"real-vs-real floor: {report['real_vs_real_floor']:.2f} (N={report['num_samples']})")
    print(format_bar(check_bar(report)) + wall_time_note(report) + "\n")
