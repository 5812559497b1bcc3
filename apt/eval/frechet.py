"""Fréchet distance between Gaussians fitted to feature sets (FID/FVD, Heusel et al. 2017).

    d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})

Statistics are accumulated and stored in float64; the matrix square root uses scipy's sqrtm
(as clean-fid / StyleGAN do), discarding the tiny imaginary part numerical error produces.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import scipy.linalg


@dataclass
class FeatureStats:
    """Running first and second moments of a feature set (float64)."""

    dim: int
    n: int = 0
    sum_D: np.ndarray | None = None
    sum_DD: np.ndarray | None = None

    def update(self, feats_ND: np.ndarray) -> None:
        feats_ND = np.asarray(feats_ND, dtype=np.float64)
        if feats_ND.ndim != 2 or feats_ND.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}), got {feats_ND.shape}")
        if self.sum_D is None:
            self.sum_D = np.zeros(self.dim)
            self.sum_DD = np.zeros((self.dim, self.dim))
        self.n += feats_ND.shape[0]
        self.sum_D += feats_ND.sum(0)
        self.sum_DD += feats_ND.T @ feats_ND

    @property
    def mu(self) -> np.ndarray:
        return self.sum_D / self.n

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance (as np.cov)."""
        if self.n < 2:
            raise ValueError("need at least 2 samples for a covariance")
        mu = self.mu
        return (self.sum_DD - self.n * np.outer(mu, mu)) / (self.n - 1)

    def save(self, path: str) -> None:
        """Atomic write of the sums and counts to an .npz file."""
        save_npz_atomic(path, sum_D=self.sum_D, sum_DD=self.sum_DD, n=self.n, dim=self.dim)

    @classmethod
    def load(cls, path: str) -> "FeatureStats":
        z = np.load(path)
        return cls(dim=int(z["dim"]), n=int(z["n"]), sum_D=z["sum_D"], sum_DD=z["sum_DD"])

    @classmethod
    def from_features(cls, feats_ND: np.ndarray) -> "FeatureStats":
        s = cls(dim=np.asarray(feats_ND).shape[1])
        s.update(feats_ND)
        return s


def frechet_distance(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
    """Fréchet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b)."""
    mu_a, mu_b = np.atleast_1d(mu_a).astype(np.float64), np.atleast_1d(mu_b).astype(np.float64)
    sigma_a, sigma_b = np.atleast_2d(sigma_a).astype(np.float64), np.atleast_2d(sigma_b).astype(np.float64)
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape:
        raise ValueError(f"shape mismatch: mu {mu_a.shape} vs {mu_b.shape}, sigma {sigma_a.shape} vs {sigma_b.shape}")
    diff = mu_a - mu_b
    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b)  # no `disp`: newer scipy removed it (seen on the H100 machine)
    if not np.isfinite(covmean).all():
        # Singular product: regularise as clean-fid / pytorch-fid do.
        eps = 1e-6 * np.eye(sigma_a.shape[0])
        covmean = scipy.linalg.sqrtm((sigma_a + eps) @ (sigma_b + eps))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))


def stats_distance(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


# --------------------------------------------------------------------------- shared by FID and FVD

T = TypeVar("T")


def file_set_key(paths: Sequence[str], **fields: Any) -> str:
    """sha256 (hex) of `fields` plus each file's absolute path and size (-1 if missing).

    The real-set cache key of FID and FVD: any change to the file list, a file's size, or a
    field (protocol, detector hash, N, format version) gives a new key.
    """
    files = [(os.path.abspath(p), os.path.getsize(p) if os.path.exists(p) else -1) for p in paths]
    payload = {**fields, "files": files}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def save_npz_atomic(path: str, **arrays: Any) -> None:
    """np.savez to a temporary file in the target directory, then rename: readers never see half a file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".npz")
    os.close(fd)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def cached_real_stats(
    cache_dir: str | None,
    *,
    prefix: str,
    paths: Sequence[str],
    key_fields: dict[str, Any],
    compute: Callable[[], T],
    save: Callable[[str, T], None],
    load: Callable[[str], T],
) -> tuple[T, str | None, bool]:
    """Real-set statistics through an .npz cache -> (value, cache file or None, cache hit).

    The file is `<cache_dir>/<prefix>_<first 20 hex of file_set_key(paths, **key_fields)>.npz`;
    `cache_dir=None` computes without caching.
    """
    if cache_dir is None:
        return compute(), None, False
    cache_file = os.path.join(cache_dir, f"{prefix}_{file_set_key(paths, **key_fields)[:20]}.npz")
    if os.path.isfile(cache_file):
        return load(cache_file), cache_file, True
    value = compute()
    save(cache_file, value)
    return value, cache_file, False


def report_table_markdown(
    result: dict,
    *,
    title: str,
    metric_rows: Sequence[tuple[str, str]],
    detector_rows: Sequence[tuple[str, str]] = (),
) -> str:
    """Markdown table of one FID/FVD result: `metric_rows`, then the sets, detector, skipped files, cache."""
    skipped = sum(len(v) for v in result["skipped"].values())
    rows = [
        *metric_rows,
        ("real set", str(result["real_source"])),
        ("generated set", str(result["generated_source"])),
        ("detector", f"{os.path.basename(result['detector']['file'])} sha256 {result['detector']['sha256'][:16]}..."),
        *detector_rows,
        ("skipped files", str(skipped)),
        ("real stats cache", f"{result['real_stats_cache']} (hit: {result['real_stats_cache_hit']})"),
    ]
    lines = [f"## {title}", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def set_facts(
    gen: str | Sequence[str],
    real: str | Sequence[str],
    *,
    num_generated: int,
    num_real: int,
    source_sizes: dict[str, list[str]],
    detector_file: str,
    detector_sha256: str,
    public_source: str,
    **detector: Any,
) -> dict:
    """The report keys on the two sets and the detector file (`detector` = its extra facts)."""
    return {
        "num_generated": num_generated,
        "num_real": num_real,
        "generated_source": gen if isinstance(gen, str) else f"{len(gen)} files",
        "real_source": real if isinstance(real, str) else f"{len(real)} files",
        "source_sizes": source_sizes,
        "detector": {"file": os.path.abspath(detector_file), "sha256": detector_sha256,
                     "public_source": public_source, **detector},
    }


def run_facts(*, skipped: dict[str, list[dict]], cache_file: str | None, cache_hit: bool, batch_size: int,
              device: Any, started: float) -> dict:
    """The report keys on how the run went: skipped files, real-stats cache, batch, device, seconds."""
    return {
        "skipped": skipped,
        "real_stats_cache": cache_file,
        "real_stats_cache_hit": cache_hit,
        "batch_size": batch_size,
        "device": str(device),
        "seconds": round(time.time() - started, 3),
    }


def load_detector(path: str, *, filename: str, metric: str, public_url: str, origin: str,
                  device: Any = "cpu") -> Any:
    """`torch.jit.load` a detector from a local file (or `filename` inside a directory); never downloads.

    A missing file is a FileNotFoundError naming the file, the metric, and its public source.
    """
    import torch  # lazy: the rest of this module is numpy only

    if os.path.isdir(path):
        path = os.path.join(path, filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{metric} detector {filename!r} not found at {path!r}. It cannot be downloaded here; "
            f"copy it from its public source {public_url} ({origin}) and pass its local path."
        )
    return torch.jit.load(path, map_location=device).eval()
