"""Drift report of long toy videos: distance and attribute accuracy per window of the training length, by frame index.

A streaming generator that was trained on its own inputs (teacher forcing) sees its own outputs at inference and
drifts as errors compound (exposure bias; Self Forcing, arXiv 2506.08009 §1). On the long-clip world
(``apt.toy.long_world``) every window of a real video is distributed as a short real clip, so each window of a
generated video can be scored against the same real statistics: the toy classifier's features of real windows
(distance) and its reading of shape, colour, direction and background against the prompt (attribute accuracy).

Legend: N videos, C channels, T frames, H/W height/width.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from apt.eval.frechet import FeatureStats, stats_distance
from apt.toy.classifier import ToyClassifier
from apt.toy.long_world import FREE_ATTRIBUTE, make_long_sample, parse_free_caption
from apt.toy.metrics import DEFAULT_CHUNK, evaluate_samples, features_and_predictions


def long_real_batches(frames: int, n: int, seed: int, batch_size: int = DEFAULT_CHUNK, start: int = 0):
    """Real clips of the long-clip world, ``make_long_sample(i, seed, frames)`` for i in [start, start + n): (x in [-1, 1], captions)."""
    for lo in range(start, start + n, batch_size):
        samples = [make_long_sample(i, seed, frames) for i in range(lo, min(lo + batch_size, start + n))]
        pixels = np.stack([s["pixels"] for s in samples])
        yield torch.from_numpy(pixels).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0, [s["caption"] for s in samples]


def long_real_stats(classifier: ToyClassifier, *, frames: int, n: int, seed: int, start: int = 0, cache_path: str | None = None) -> FeatureStats:
    """Classifier feature statistics of n real windows of ``frames`` frames (cached in ``cache_path`` when given)."""
    if cache_path and os.path.exists(cache_path):
        stats = FeatureStats.load(cache_path)
        if stats.n == n and stats.dim == classifier.num_features:
            return stats
    stats, _ = features_and_predictions(classifier, (x for x, _ in long_real_batches(frames, n, seed, start=start)), DEFAULT_CHUNK)
    if cache_path:
        stats.save(cache_path)
    return stats


def window_metrics(classifier: ToyClassifier, x_NCTHW: torch.Tensor, prompts: list[str], real: FeatureStats, *, window_frames: int,
                   starts: list[int] | None = None) -> list[dict]:
    """Distance and attribute accuracy of the windows [s, s + window_frames) of every video, one dict per start s
    (default: every non-overlapping window, i.e. the drift curve).

    Prompts of the free-shape and free-colour worlds (``apt.toy.long_world``) leave one attribute out: a window's
    value of it is right when it is the one the classifier reads in the video's first window (it must persist; the
    per-attribute key is ``shape_kept`` / ``colour_kept``), the other attributes are compared with the prompt."""
    T = x_NCTHW.shape[2]
    starts = list(range(0, T - window_frames + 1, window_frames)) if starts is None else starts
    free = _free_attribute(prompts)
    firsts = features_and_predictions(classifier, [x_NCTHW[:, :, :window_frames]], DEFAULT_CHUNK)[1][free] if free else None
    out = []
    for s in starts:
        if s < 0 or s + window_frames > T:
            raise ValueError(f"window [{s}, {s + window_frames}) outside a {T}-frame video")
        x = x_NCTHW[:, :, s : s + window_frames]
        m = _free_scores(classifier, x, prompts, real, free, firsts) if free else evaluate_samples(classifier, x, prompts, real)
        out.append({"first_frame": s, "distance": round(m["distance"], 2), "attribute_accuracy": round(m["attribute_accuracy"], 4),
                    "per_attribute": {k: round(v, 4) for k, v in m["per_attribute"].items()}})
    return out


def _free_attribute(prompts: list[str]) -> str | None:
    """"shape" or "colour" for prompts of a world captioned without it; None for full captions."""
    try:
        return FREE_ATTRIBUTE[parse_free_caption(prompts[0])[0]]
    except ValueError:
        return None


def _free_scores(classifier: ToyClassifier, x_NCTHW: torch.Tensor, prompts: list[str], real: FeatureStats, free: str, firsts: list[str]) -> dict:
    """Distance, and the accuracy of the captioned attributes with the first window's ``free`` attribute kept."""
    stats, preds = features_and_predictions(classifier, [x_NCTHW], DEFAULT_CHUNK)
    wanted = [parse_free_caption(p)[1] for p in prompts]
    hits = {name: [p == w[name] for p, w in zip(preds[name], wanted)] for name in wanted[0]}
    hits[f"{free}_kept"] = [p == f for p, f in zip(preds[free], firsts)]
    joint = np.logical_and.reduce([np.array(h) for h in hits.values()])
    return {"distance": stats_distance(stats, real), "attribute_accuracy": float(joint.mean()),
            "per_attribute": {k: float(np.mean(v)) for k, v in hits.items()}}


def format_drift(name: str, curve: list[dict], window_frames: int) -> str:
    """One line per window: frames, distance, attribute accuracy."""
    lines = [f"drift of {name} (windows of {window_frames} frames):"]
    for w in curve:
        lines.append(f"  frames {w['first_frame']:>4}-{w['first_frame'] + window_frames - 1:<4} distance {w['distance']:>8.2f}  attribute accuracy {w['attribute_accuracy']:.3f}")
    return "\n".join(lines)
