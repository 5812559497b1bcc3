"""How the demo report's distances and bar ratios depend on the sample size N, and their N -> infinity limit.

    python experiments/toy_distance_vs_n.py --teacher assets/demo_teacher --distilled runs/demo/distill \
        --apt runs/demo/apt_video/checkpoints/step-000200 [--sizes 1000 2000 5000]

A Fréchet distance from N samples is biased upward by roughly k / N, with k different for every model
(Chong & Forsyth, "Effectively Unbiased FID and Inception Score and where to find them", CVPR 2020). Until
2026-12-05 the demo's report used N = 1000, where the real-vs-real floor (5.0) is most of the teacher's
distance (6.2), so every ratio the bar takes between rows carried that bias; this script showed it, and the
report now uses 5000 (``apt.toy.report.REPORT_SAMPLES``; docs/log/demo_tuning.md, fifteenth round).

It draws the report's rows (the teacher at its own steps and CFG, the distilled and APT models at one step,
APT at two) on the report's prompts and noise seeds up to the largest N (``eval_prompts`` and the noise seeds
are prefix-stable, so the first N samples are the report's set at that N and reproduce its distances), scores
the first N of them against the first N real clips for each size, and fits d(N) = d_inf + k / N by least
squares over the sizes (FID-infinity). ``--split validation`` does the same on the validation set's prompts,
seeds and real clips: a second draw, disjoint from the report's. The floor at each N is the distance between
real clips [0, N) and [N, 2N); its fitted d_inf is near 0 when the sizes are in the 1/N regime (on the toy,
1000 is not: the floor falls 3.4x from 1000 to 2000, and its fit over 1000-5000 gives -0.4 to -0.7). Prints
one JSON line per row and one with the bar's two distance ratios (apt-1step / teacher, apt-1step / distilled)
at each N and at the fitted limit.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from apt.eval.frechet import FeatureStats, stats_distance
from apt.inference import load_generator
from apt.toy.classifier import load_toy_classifier
from apt.toy.metrics import DEFAULT_CHUNK, real_batches, rechunk
from apt.toy.report import SPLITS, generate_seeded
from apt.toy.world import eval_prompts


@torch.no_grad()
def features(classifier, batches) -> np.ndarray:
    """Classifier features (N, F) of a stream of clip batches, in the report's chunks of DEFAULT_CHUNK."""
    classifier.eval()
    return np.concatenate([classifier.features(x).double().numpy() for x in rechunk(batches, DEFAULT_CHUNK)])


def fit_limit(sizes: list[int], distances: list[float]) -> tuple[float, float]:
    """Least-squares (d_inf, k) of d(N) = d_inf + k / N."""
    A = np.stack([np.ones(len(sizes)), 1.0 / np.asarray(sizes, dtype=np.float64)], axis=1)
    (d_inf, k), *_ = np.linalg.lstsq(A, np.asarray(distances, dtype=np.float64), rcond=None)
    return float(d_inf), float(k)


def distances_by_n(row_feats: dict[str, np.ndarray], real_feats: np.ndarray, sizes: list[int]) -> dict[str, list[float]]:
    """Each row's distance at each N (its first N samples against the first N real clips), and the floor."""
    if real_feats.shape[0] < 2 * max(sizes):
        raise ValueError(f"the floor at N = {max(sizes)} needs {2 * max(sizes)} real clips, got {real_feats.shape[0]}")
    out: dict[str, list[float]] = {name: [] for name in [*row_feats, "real-vs-real floor"]}
    for n in sizes:
        real = FeatureStats.from_features(real_feats[:n])
        for name, feats in row_feats.items():
            out[name].append(stats_distance(FeatureStats.from_features(feats[:n]), real))
        out["real-vs-real floor"].append(stats_distance(FeatureStats.from_features(real_feats[n : 2 * n]), real))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--distilled", required=True)
    ap.add_argument("--apt", required=True, help="the APT checkpoint the report chose")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 5000])
    ap.add_argument("--split", choices=sorted(SPLITS), default="report", help="the report's prompts and seeds, or the validation set's (a second, disjoint draw)")
    ap.add_argument("--classifier", default="assets/toy_classifier")
    args = ap.parse_args(argv)
    sizes = sorted(args.sizes)
    if len(sizes) < 2 or sizes[0] < 2:
        ap.error(f"--sizes needs at least two sizes >= 2 to fit the limit, got {args.sizes}")
    classifier = load_toy_classifier(args.classifier)
    teacher, distilled, apt = load_generator(args.teacher), load_generator(args.distilled), load_generator(args.apt)
    rows = {"teacher-25step-cfg": (teacher, None), "distilled-1step": (distilled, 1), "apt-1step": (apt, 1), "apt-2step": (apt, 2)}
    n_max, frames = sizes[-1], apt.num_frames
    prompt_seed, noise_seed = SPLITS[args.split]
    prompts = eval_prompts(n_max, seed=prompt_seed, frames=frames)
    seeds = [noise_seed + i for i in range(n_max)]
    row_feats = {name: features(classifier, [generate_seeded(gen, prompts, seeds, steps=steps, frames=frames)]) for name, (gen, steps) in rows.items()}
    real_feats = features(classifier, (x for x, _ in real_batches(frames, 2 * n_max, prompt_seed)))
    table = distances_by_n(row_feats, real_feats, sizes)
    out = []
    for name, ds in table.items():
        d_inf, k = fit_limit(sizes, ds)
        out.append({"row": name, "split": args.split, "sizes": sizes, "distance": [round(d, 3) for d in ds], "d_inf": round(d_inf, 3), "k": round(k, 1)})
        print(json.dumps(out[-1]), flush=True)
    by_name = {r["row"]: r for r in out}
    apt_row = by_name["apt-1step"]
    at_n, at_limit = {}, {}
    for key, other in (("apt_over_teacher", by_name["teacher-25step-cfg"]), ("apt_over_distilled", by_name["distilled-1step"])):
        at_n[key] = [round(a / o, 3) for a, o in zip(apt_row["distance"], other["distance"])]
        at_limit[key] = round(apt_row["d_inf"] / other["d_inf"], 3)
    out.append({"row": "bar ratios", "split": args.split, "sizes": sizes, **at_n, "at_limit": at_limit})
    print(json.dumps(out[-1]), flush=True)
    return out


if __name__ == "__main__":
    main()
