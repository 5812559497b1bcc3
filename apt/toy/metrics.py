"""Toy benchmark metrics: a Fréchet distance in the toy classifier's feature space + attribute accuracy.

    distance            Fréchet distance between Gaussians fitted to classifier features of the
                        samples and of real toy clips (FID/FVD-style, docs/design.md §4).
    attribute_accuracy  share of samples whose predicted shape AND colour AND background AND
                        (clips only, frames > 1) direction all match the prompt's parsed caption:
                        an exact text-alignment score.
    per_attribute       the same accuracy per attribute.

Report the real-vs-real floor (`real_vs_real_floor`, two disjoint real sets of the same size n)
next to every distance, with n and the seeds: at n = 1000 the demo's distances move by 0.4-1.4 between two draws of the
prompts and seeds and the floor is 3.7-6.2, near the teacher's distance (docs/log/demo_tuning.md, fifteenth round).

Results do not depend on how the caller batches the samples: clips are re-chunked into fixed
chunks of `chunk` clips before the classifier sees them, and statistics accumulate in float64.

Shape legend: N samples, B batch, C channels, T frames, H height, W width, F feature dim.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from apt.eval.frechet import FeatureStats, stats_distance
from apt.toy import world
from apt.toy.classifier import ATTRIBUTES, ToyClassifier

DEFAULT_CHUNK = 250
VAL_PROMPT_SEED, VAL_NOISE_SEED = 4321, 20_000
"""The validation split (prompts ``world.eval_prompts(n, seed=VAL_PROMPT_SEED)``, noise seeds VAL_NOISE_SEED + i):
what training logs (``eval.every_steps``) and what the demo picks its APT checkpoint on; disjoint from
the demo report's prompts and seeds."""


def real_batches(
    frames: int, n: int, seed: int, batch_size: int = DEFAULT_CHUNK, start: int = 0
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Real clips `make_sample(i, seed, frames)`, i in [start, start + n): (x_BCTHW in [-1, 1], captions)."""
    for lo in range(start, start + n, batch_size):
        samples = [world.make_sample(i, seed, frames) for i in range(lo, min(lo + batch_size, start + n))]
        pixels_BTHWC = torch.from_numpy(np.stack([s["pixels"] for s in samples]))
        yield pixels_BTHWC.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0, [s["caption"] for s in samples]


def rechunk(batches: Iterable[torch.Tensor], chunk: int) -> Iterator[torch.Tensor]:
    """Re-batch a stream of (B, C, T, H, W) tensors into chunks of exactly `chunk` (the last may be short)."""
    buf: list[torch.Tensor] = []
    size = 0
    for x_BCTHW in batches:
        if x_BCTHW.ndim != 5:
            raise ValueError(f"sample batches must be (B, C, T, H, W), got {tuple(x_BCTHW.shape)}")
        buf.append(x_BCTHW.detach().float().cpu())
        size += x_BCTHW.shape[0]
        while size >= chunk:
            x = torch.cat(buf)
            yield x[:chunk]
            buf, size = ([x[chunk:]] if x.shape[0] > chunk else []), x.shape[0] - chunk
    if size:
        yield torch.cat(buf)


@torch.no_grad()
def features_and_predictions(
    classifier: ToyClassifier, batches: Iterable[torch.Tensor], chunk: int
) -> tuple[FeatureStats, dict[str, list[str]]]:
    """Feature statistics of clip batches (B, C, T, H, W) and the classifier's predicted class names
    per attribute, in input order."""
    classifier.eval()
    device = next(classifier.parameters()).device
    stats = FeatureStats(dim=classifier.num_features)
    preds: dict[str, list[str]] = {name: [] for name in ATTRIBUTES}
    for x_BCTHW in rechunk(batches, chunk):
        x_BCTHW = x_BCTHW.to(device)
        f_BF = classifier.features(x_BCTHW)
        stats.update(f_BF.double().cpu().numpy())
        for name, head in classifier.heads.items():
            preds[name].extend(ATTRIBUTES[name][i] for i in head(f_BF).argmax(-1).tolist())
    return stats, preds


def real_stats(
    classifier: ToyClassifier,
    frames: int,
    n: int,
    seed: int,
    cache_path: str | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> FeatureStats:
    """Feature statistics (float64) of n real clips `make_sample(i, seed, frames)`, i < n.

    With `cache_path` (.npz), loads it when present (checking n and the feature dim) or writes it.
    The cache does not know which classifier made it: use one path per classifier checkpoint.
    """
    if cache_path is not None and os.path.exists(cache_path):
        cached = FeatureStats.load(cache_path)
        if cached.n != n or cached.dim != classifier.num_features:
            raise ValueError(
                f"cached real stats {cache_path} have n={cached.n}, dim={cached.dim}; "
                f"asked for n={n}, dim={classifier.num_features} (delete the file to recompute)"
            )
        return cached
    stats, _ = features_and_predictions(
        classifier, (x for x, _ in real_batches(frames, n, seed, chunk)), chunk
    )
    if cache_path is not None:
        stats.save(cache_path)
    return stats


def correct_mask(predictions: dict[str, list[str]], prompts: list[str]) -> tuple[np.ndarray, dict[str, float]]:
    """Per-sample joint correctness (N,) of predicted class names against parsed prompts, and the
    per-attribute accuracy (attributes the prompts leave unset, e.g. an image's direction, are skipped)."""
    targets = [world.parse_caption(p) for p in prompts]
    correct_N = np.ones(len(targets), dtype=bool)
    per_attribute: dict[str, float] = {}
    for name in ATTRIBUTES:
        wanted = [getattr(a, name) for a in targets]
        if all(w is None for w in wanted):  # images: no direction
            continue
        hit_N = np.array([p == w for p, w in zip(predictions[name], wanted, strict=True)])
        per_attribute[name] = float(hit_N.mean())
        correct_N &= hit_N
    return correct_N, per_attribute


AMBIGUOUS_SHAPE = 0.9
"""A sample's shape is ambiguous when the classifier's shape head gives no shape this probability (a blob
between two shapes; docs/log/demo_tuning.md, eleventh round)."""


@torch.no_grad()
def judge(classifier: ToyClassifier, x_BCTHW: torch.Tensor, prompts: list[str]) -> tuple[FeatureStats, np.ndarray, np.ndarray]:
    """The samples' feature statistics and, per sample (N,), whether every classified attribute matches the
    prompt and whether the shape is ambiguous (``AMBIGUOUS_SHAPE``)."""
    stats, preds = features_and_predictions(classifier, [x_BCTHW], len(prompts))
    ok_N, _ = correct_mask(preds, prompts)
    shape_p = classifier.heads["shape"](classifier.features(x_BCTHW)).softmax(-1).max(-1).values
    return stats, ok_N, (shape_p < AMBIGUOUS_SHAPE).cpu().numpy()


def attribute_scores(predictions: dict[str, list[str]], prompts: list[str]) -> dict:
    """Joint and per-attribute accuracy of predicted class names against parsed prompts."""
    correct_N, per_attribute = correct_mask(predictions, prompts)
    return {"attribute_accuracy": float(correct_N.mean()), "per_attribute": per_attribute}


def evaluate_samples(
    classifier: ToyClassifier,
    samples: torch.Tensor | Iterable[torch.Tensor],
    prompts: list[str],
    real_stats: FeatureStats,
    chunk: int = DEFAULT_CHUNK,
) -> dict:
    """Score generated clips against their prompts and the real statistics.

    `samples`: x (N, C, T, H, W) in [-1, 1], or an iterable of such batches, in prompt order.
    Returns {"distance", "attribute_accuracy", "per_attribute": {attribute: accuracy}, "n"}; the
    joint accuracy uses shape, colour, background and, for clips, direction.
    """
    batches = [samples] if isinstance(samples, torch.Tensor) else samples
    stats, preds = features_and_predictions(classifier, batches, chunk)
    if stats.n != len(prompts):
        raise ValueError(f"got {stats.n} samples for {len(prompts)} prompts")
    return {"distance": stats_distance(stats, real_stats), **attribute_scores(preds, prompts), "n": stats.n}


def real_vs_real_floor(
    classifier: ToyClassifier, frames: int, n: int, seed: int, chunk: int = DEFAULT_CHUNK, first: FeatureStats | None = None
) -> float:
    """Distance between two disjoint real sets of n clips (indices [0, n) and [n, 2n) of `seed`):
    the smallest distance a perfect generator can expect at this n. `first`: the caller's
    `real_stats(classifier, frames, n, seed)` of the first set, if it has them."""
    a = first if first is not None else features_and_predictions(classifier, (x for x, _ in real_batches(frames, n, seed, chunk)), chunk)[0]
    if a.n != n:
        raise ValueError(f"first real set has n={a.n}, expected {n}")
    b, _ = features_and_predictions(
        classifier, (x for x, _ in real_batches(frames, n, seed, chunk, start=n)), chunk
    )
    return stats_distance(a, b)
